"""Training images per second of the slide CNN on this CPU, fp32 and bf16 autocast, with and without channels_last.

    python bench/precision_cost.py [--steps 20]

On a CPU with native bf16 (AVX-512 BF16 or AMX) bf16 autocast + channels_last is the fastest setting
(docs/benchmarks.md); on one without (AVX2 only), oneDNN emulates bf16 and the same step is many times slower,
which is why cnnlab warns when a run asks for bf16 on such a CPU. A benchmark, not a test.
"""

import argparse
import time

import torch

from cnnlab.model import SlideCNN


def images_per_second(channels_last: bool, bf16: bool, steps: int, batch: int = 64) -> float:
    torch.manual_seed(0)
    net = SlideCNN(3, 32, 10, 32, 3, 64, 4, 1, 0, "max", 2, 0.25, channels_last=channels_last)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(net(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up: oneDNN picks its kernels
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native}, "
          f"{torch.get_num_threads()} threads, batch 64")  # fmt: skip
    print("| layout | fp32 images/s | bf16 autocast images/s | bf16 / fp32 |\n| --- | --- | --- | --- |")
    for channels_last in (False, True):
        fp32, bf16 = (images_per_second(channels_last, bf16, args.steps) for bf16 in (False, True))
        layout = "channels_last" if channels_last else "contiguous"
        print(f"| {layout} | {fp32:,.0f} | {bf16:,.0f} | {bf16 / fp32:.2f} |")


if __name__ == "__main__":
    main()
