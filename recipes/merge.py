"""Merge a LoRA adapter into its base model: `python recipes/merge.py --adapter out/sft --output_dir out/sft-merged`.

The merged model is the next stage's policy start and reference. `--push_to_hub --hub_model_id ID` pushes it."""

from entropo_trl.train import merge_adapter

if __name__ == "__main__":
    merge_adapter()
