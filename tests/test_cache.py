"""The decoded-image cache under real processes: built by two at once, or killed while it is written."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnnlab.data.trees import load_tree_cached
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # real processes, two at once or killed: the full tier

# Builds the cache of argv[1] in argv[2]; each .npy file takes argv[3] seconds longer to write, so that two
# builds overlap (or one can be killed half-way); prints a checksum of what it returned.
BUILD = """
import sys, time, zlib
from pathlib import Path
import numpy as np
import cnnlab.data.trees

save = np.save
def slow_save(*args, **kwargs):
    Path(sys.argv[2], "writing").touch()
    time.sleep(float(sys.argv[3]))
    save(*args, **kwargs)
cnnlab.data.trees.np.save = slow_save
arrays = cnnlab.data.trees.load_tree_cached(Path(sys.argv[1]), Path(sys.argv[2]), 32, "RGB")
print(zlib.crc32(np.ascontiguousarray(arrays.train_images).tobytes()), len(arrays.test_labels))
"""


def build(source: Path, cache_dir: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", BUILD, str(source), str(cache_dir), str(delay)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def caches(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.name.startswith("images-"))


def test_two_processes_building_the_same_cache_both_succeed(tree_archive, tmp_path):
    cache_dir = tmp_path / "cache"
    first, second = build(tree_archive, cache_dir, 0.3), build(tree_archive, cache_dir, 0.3)
    outputs = [process.communicate(timeout=120) for process in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    assert outputs[0][0] == outputs[1][0]  # the same arrays
    (cache,) = caches(cache_dir)  # one cache, no temp folder left
    assert not cache.endswith(".tmp")
    again = load_tree_cached(tree_archive, cache_dir, 32, "RGB")
    assert isinstance(again.train_images, np.memmap)  # read from the cache, not decoded again
    assert outputs[0][0].split()[1] == str(len(again.test_labels))


def test_a_build_killed_half_way_leaves_nothing_taken_for_a_cache(tree_archive, tmp_path):
    cache_dir = tmp_path / "cache"
    process = build(tree_archive, cache_dir, 30)
    deadline = time.monotonic() + 60
    while not (cache_dir / "writing").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    (left,) = caches(cache_dir)
    assert left.endswith(".tmp")  # only the killed build's temp folder, named by its process id
    arrays = load_tree_cached(tree_archive, cache_dir, 32, "RGB")  # decodes again, and clears the abandoned folder
    assert not isinstance(arrays.train_images, np.memmap)
    (cache,) = caches(cache_dir)
    assert not cache.endswith(".tmp")
