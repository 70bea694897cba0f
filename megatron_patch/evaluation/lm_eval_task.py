"""lm-evaluation-harness on an exported model: a local LAMBADA task and the command that runs it.

  python -m megatron_patch.evaluation.lm_eval_task --data lambada.jsonl --task-dir DIR [--name NAME]

writes DIR/NAME.yaml, a task with lm-eval's own `lambada_openai` protocol (context =
text.split(' ')[:-1] joined by ' ', target = ' ' + the last word; metrics acc and perplexity)
reading the local jsonl through the `json` dataset builder, so it runs offline:

  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf \
      --model_args pretrained=HF_DIR,dtype=float32 --tasks NAME --include_path DIR --device cpu

See docs/lm_eval.md (the standard tasks, and how the numbers relate to tools/evaluate.py).
"""

import argparse
import glob
import json
import os
import sys

# lm-eval 0.4's tasks/lambada/lambada_openai.yaml, with the data set replaced by a local file.
TEMPLATE = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_lambada_task(data: str, task_dir: str, name: str = "lambada_local") -> str:
    """Write task_dir/name.yaml for the jsonl `data` ({"text": ...} lines); returns its path."""
    os.makedirs(task_dir, exist_ok=True)
    path = os.path.join(task_dir, f"{name}.yaml")
    with open(path, "w") as f:
        f.write(TEMPLATE.format(name=name, data=json.dumps(os.path.abspath(data))))
    return path


def command(hf_dir: str, task: str, include_path: str, output_path: str, batch_size: int = 8,
            max_length: int = None, lm_eval: str = "lm_eval") -> list:
    """The lm_eval command line for an exported model on CPU in fp32."""
    model_args = f"pretrained={hf_dir},dtype=float32" + (f",max_length={max_length}" if max_length else "")
    return [lm_eval, "--model", "hf", "--model_args", model_args, "--tasks", task, "--include_path", include_path,
            "--device", "cpu", "--batch_size", str(batch_size), "--output_path", output_path]


def offline_env(base=None) -> dict:
    """Environment for an offline run: no hub look-ups, local data sets only."""
    return dict(base if base is not None else os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1")


def read_results(output_path: str, task: str) -> dict:
    """{metric: value} of `task` from the newest results JSON lm_eval wrote under output_path
    (keys like "acc,none" become "acc")."""
    files = sorted(glob.glob(os.path.join(output_path, "**", "results*.json"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no lm_eval results under {output_path}")
    with open(files[-1]) as f:
        results = json.load(f)["results"][task]
    return {k.split(",")[0]: v for k, v in results.items() if k != "alias"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help='jsonl of {"text": ...} passages (e.g. heldout.py\'s lambada.jsonl).')
    p.add_argument("--task-dir", required=True, help="Directory to write the YAML to (lm_eval --include_path).")
    p.add_argument("--name", default="lambada_local")
    args = p.parse_args(argv)
    if not os.path.isfile(args.data):
        print(f"lm_eval_task: error: --data {args.data} not found", file=sys.stderr)
        return 1
    print(write_lambada_task(args.data, args.task_dir, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
