"""What CW-L2 costs with ``cw``'s defaults and with ``cw-paper`` (the paper's optimiser settings):
forward and backward passes per example (each Adam iteration is one of each), process seconds and the
uncapped L2 distance found, on a fixed random subset of a run's test images.

    python plugins/advframe-cw/benchmarks/paper_cost.py RUN_DIR [--examples 5]
"""

import argparse
import time

import advframe_cw
import advframe_cw_paper
import torch
from torch import nn

from advframe import data
from advframe.config import load_file, resolve
from advframe.plugins import make_plugin_host
from advframe.runner import load_trained_model


class Counted(nn.Module):
    """Counts the examples that go through the model (one per example and iteration)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.examples = model, 0

    def forward(self, inputs):
        self.examples += len(inputs)
        return self.model(inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--examples", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    host = make_plugin_host()
    model = load_trained_model(host, args.run_dir, "cpu")
    config = resolve(host, load_file(f"{args.run_dir}/config.yaml"), ["device=cpu"])
    test = data.load(config["data"]).test
    chosen = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:args.examples]
    inputs, labels = test.batch(chosen, torch.device("cpu"))
    print("| attack | passes per example | process s | L2 distance per example |\n|---|---|---|---|")
    for name, settings in (("cw", advframe_cw.DEFAULTS), ("cw-paper", advframe_cw_paper.DEFAULTS)):
        counted = Counted(model)
        l2 = {key: settings[key] for key in advframe_cw.L2_KEYS if key not in ("targeted", "stop_on_success")}
        start = time.process_time()
        _, distance = advframe_cw.cw_l2(counted, inputs, labels, eps=float("inf"), **l2)
        seconds = time.process_time() - start
        shown = ", ".join(f"{d:.3f}" for d in distance.tolist())
        print(f"| {name} | {counted.examples / len(inputs):,.0f} | {seconds:.1f} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
