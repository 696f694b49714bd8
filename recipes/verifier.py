"""The verifier stage: `accelerate launch recipes/verifier.py --model MODEL_ID --dataset_name DATA [--flag value ...]`.

`--model` picks `recipes/<model-slug>/verifier.yaml` (override with `--config FILE`); any field can be set on the
command line. See docs/recipes.md."""

from entropo_trl.train import run_stage

if __name__ == "__main__":
    run_stage("verifier")
