"""Trajectories and training rows: the trajectory record with its readers and writers (`trajectory`), the row
builders for SFT, EntroPO-DPO, EntroPO-KTO and the verifier (`builders`), context truncation (`truncation`), the
ShareGPT / LLaMA-Factory bridge (`sharegpt`) and the `entropo data` command (`cli`)."""
