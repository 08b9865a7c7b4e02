"""`proc_status.start_peak` measures from a model whose weights are all resident (Linux)."""

from __future__ import annotations

import torch


def test_make_resident_pages_in_file_mapped_weights(load_benchmark, tmp_path):
    proc_status = load_benchmark("proc_status")
    path = tmp_path / "weights.bin"
    floats = 16 * 2**20  # 64 MiB
    path.write_bytes(bytes(floats * 4))
    module = torch.nn.Module()
    # mapped from the file, as transformers maps safetensors weights: no page is resident until read
    module.register_buffer("weight", torch.from_file(str(path), shared=True, size=floats, dtype=torch.float32))
    before = proc_status.status_kib("RssFile")
    proc_status.make_resident(module)
    grown = proc_status.status_kib("RssFile") - before
    assert grown >= 48 * 1024, f"only {grown} KiB of the 64 MiB mapping became resident"
    base = proc_status.start_peak(module)  # already resident: the base is read after it
    assert abs(proc_status.status_kib("VmRSS") - base) < 16 * 1024
