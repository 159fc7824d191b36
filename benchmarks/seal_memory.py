"""Where a SEAL run's memory goes: key generation, then the evaluation, against the cost model.

    python benchmarks/seal_memory.py r8ni.hec --input benchmarks/.cache/resnet8_poly.input.npy

(``r8ni.hec`` from ``hecompile benchmarks/.cache/resnet8_poly.onnx -o r8ni.hec --max-refreshes 0
--max-memory 22G --no-check``.)  One process, nothing else loaded: the resident set before key
generation, after it (beside the keys' size the cost model uses), and its peak during the
evaluation (sampled as the executor reports progress).  Beside the evaluation's growth it prints
the ciphertext bytes the cost model predicts two ways: the most alive at once, and, for each level,
the most of that level alive at once, added (what SEAL's memory pool, which keeps freed memory by
allocation size, holds: ``CostModel.pools_by_size``), and the plaintexts the executor caches.
"""

from __future__ import annotations

import argparse

import numpy as np

from hecompiler.backends.seal import SealClient, SealServer
from hecompiler.costmodel import CostModel, program_cost
from hecompiler.hecfile import load_hec


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class _Collected(CostModel):
    """The SEAL table, with ciphertexts counted as a collected heap holds them (the most alive at once)."""

    pools_by_size = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("program")
    ap.add_argument("--input", required=True)
    a = ap.parse_args()
    prog, _ = load_hec(a.program)
    pooled, collected = program_cost(prog, CostModel()), program_cost(prog, _Collected())
    x = np.load(a.input)
    start = rss_mib()
    client = SealClient.create(prog)
    after_keygen = rss_mib()
    server = SealServer(prog, client.public_keys())
    cts = client.encrypt_inputs({prog.inputs[0].name: x})
    peak = [rss_mib()]

    def sample(_n: int) -> None:
        peak[0] = max(peak[0], rss_mib())

    server.run(cts, client.refresh, sample)
    mib = 2**20
    print(f"resident before key generation {start:.0f} MiB, after {after_keygen:.0f} MiB "
          f"(+{after_keygen - start:.0f}; the keys: {pooled.key_bytes / mib:.0f} MiB)")
    print(f"peak during the evaluation {peak[0]:.0f} MiB: +{peak[0] - after_keygen:.0f} MiB over key generation")
    print(f"predicted ciphertexts: {collected.peak_ciphertext_bytes / mib:.0f} MiB alive at once, "
          f"{pooled.peak_ciphertext_bytes / mib:.0f} MiB as per-level peaks; plaintexts "
          f"{(pooled.plaintext_bytes + pooled.plaintext_cache_bytes) / mib:.0f} MiB (working set and cache)")
    print(f"predicted peak {pooled.memory_bytes / mib:.0f} MiB "
          f"({collected.memory_bytes / mib:.0f} MiB counting ciphertexts alive at once)")


if __name__ == "__main__":
    main()
