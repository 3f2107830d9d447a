"""Train the digits ViT (`tome_digits_vit`) from scratch and write the committed weights.

    python benchmarks/train_digits_vit.py                 # writes tome_deploy/assets/digits_vit.{safetensors,json}
    python benchmarks/train_digits_vit.py --check         # retrain, compare with the committed record, write nothing
    python benchmarks/train_digits_vit.py --write-data    # derive tome_deploy/assets/digits.npz again (scikit-learn)

Deterministic: the same seed gives the same weights on one machine and thread count; on other hardware
the float rounding of the kernels can differ, so the accuracy (not the bytes) is what reproduces.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from tome_deploy.models.digits import ASSET_DATA, ASSET_JSON, ASSET_WEIGHTS, recorded_accuracy
from tome_deploy.models.digits_training import TrainConfig, save_digits_vit, train, write_digits_data
from tome_deploy.models.loading.fingerprint import weights_fingerprint


def parse_args() -> argparse.Namespace:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--weights", type=Path, default=ASSET_WEIGHTS, help="output safetensors file")
    parser.add_argument("--record", type=Path, default=ASSET_JSON, help="output JSON record")
    parser.add_argument(
        "--check",
        action="store_true",
        help="retrain and compare with the committed record (within 1 point); write nothing",
    )
    parser.add_argument(
        "--write-data",
        action="store_true",
        help=f"only derive {ASSET_DATA.name} (the digits and the split) again from scikit-learn and write it",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.write_data:
        write_digits_data(ASSET_DATA)
        print(f"wrote {ASSET_DATA}", file=sys.stderr)
        return 0
    config = dataclasses.replace(TrainConfig(), epochs=args.epochs)
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    say(f"training tome_digits_vit: seed {args.seed}, {config}, torch threads {torch.get_num_threads()}")
    start = time.perf_counter()
    model, accuracy = train(args.seed, config, log=say)
    seconds = time.perf_counter() - start
    say(f"test accuracy {accuracy:.2%} after {seconds:.0f} s; weights sha256 {weights_fingerprint(model)[:16]}")
    if args.check:
        committed = recorded_accuracy(args.record)
        delta = 100 * (accuracy - committed)
        verdict = "PASS" if abs(delta) <= 1.0 else "FAIL"
        print(
            json.dumps(
                {
                    "retrained_accuracy": accuracy,
                    "committed_accuracy": committed,
                    "delta_points": round(delta, 3),
                    "seconds": round(seconds, 1),
                    "verdict": verdict,
                }
            )
        )
        return 0 if verdict == "PASS" else 1
    info = save_digits_vit(
        model,
        accuracy,
        args.seed,
        config,
        weights=args.weights,
        record=args.record,
        extra={"train_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads()},
    )
    say(f"wrote {args.weights} ({args.weights.stat().st_size / 1e6:.2f} MB) and {args.record}")
    print(json.dumps({key: info[key] for key in ("test_accuracy", "test_correct", "test_size", "seed")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
