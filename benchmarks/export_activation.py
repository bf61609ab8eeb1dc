"""Why ONNX Runtime speeds up one U-Net more than another: eager (channels-last and contiguous) vs ONNX Runtime for
one U-Net of the zoo entries' shape with ReLU (the two-stage U-Net's activation) and SELU (the NB U-Net's).

Random weights (speed only), one batch of ``--batch`` x 3 x ``--size`` x ``--size`` patches, ``--threads`` threads
for both runtimes, one runtime after the other, minimum over ``--repeats`` runs of each. docs/export.md ("Speed")
has the numbers and what they explain.

    python benchmarks/export_activation.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's nuclei_d2, whatever the venv has installed


def _time(fn, arg, repeats: int) -> float:
    fn(arg)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(arg)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--activations", nargs="+", default=["relu", "selu"])
    args = p.parse_args(argv)

    import onnxruntime as ort

    from nuclei_d2.modeling.unet import UNet

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for act in args.activations:
            net = UNet(in_channels=3, out_channels=1, depth=4, base_channels=16, activation=act, pad_mode="reflect",
                       upsample="transpose").eval()
            x = torch.randn(args.batch, 3, args.size, args.size)
            path = Path(tmp) / f"unet_{act}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(net, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17,
                                  dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}}, dynamo=False)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.inter_op_num_threads = 1
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = {"x": x.numpy()}
            x_cl = x.contiguous(memory_format=torch.channels_last)
            net_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
            with torch.inference_mode():
                t_cont = _time(net, x, args.repeats)
                t_cl = _time(net_cl, x_cl, args.repeats)
            t_ort = _time(lambda f, s=sess: s.run(None, f), feed, args.repeats)
            rows.append((act, t_cl, t_cont, t_ort))

    print(f"\nOne U-Net (base 16, depth 4), {args.batch} x 3 x {args.size} x {args.size}, {args.threads} thread(s), "
          f"minimum of {args.repeats} runs\n")
    print("| activation | eager channels-last s | eager contiguous s | ONNX Runtime s | speed-up over channels-last |")
    print("|---|---|---|---|---|")
    for act, t_cl, t_cont, t_ort in rows:
        print(f"| {act} | {t_cl:.3f} | {t_cont:.3f} | {t_ort:.3f} | {t_cl / t_ort:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
