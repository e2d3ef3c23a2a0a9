"""Use the trained model: predict on image files, export to ONNX and .pt2 with a parity check, evaluate anywhere.

One tiny model is trained for the module; the images it predicts are made here in several sizes and modes.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from cnnlab import UserError
from cnnlab.evaluate import evaluate
from cnnlab.export import export, export_checked
from cnnlab.export import parity as parity_of
from cnnlab.images import read_images
from cnnlab.predict import predict, predict_files
from cnnlab.train import train
from cnnlab.trained import Model, build_net, load_model
from tests.conftest import BOTH_WAYS, CLASSES, ROOT, compose_config, run_in_process


@pytest.fixture(scope="module")
def trained(tree_archive, tmp_path_factory) -> dict:
    """A 2-epoch run on the tiny archive, its best checkpoint exported to both formats."""
    root = tmp_path_factory.mktemp("trained")
    overrides = [f"data.root={tree_archive}", f"data.cache_dir={root / 'cache'}", "data.val_size=20", "trainer=cpu",
                 "trainer.max_epochs=2", f"output_dir={root / 'run'}"]  # fmt: skip
    metrics = train(compose_config("train", overrides))
    data = OmegaConf.create({"name": "cifar10", "root": str(tree_archive), "download": False,
                             "cache_dir": str(root / "cache"), "channels": "RGB", "image_size": 32})  # fmt: skip
    exported = {}
    for format in ("onnx", "pt2"):
        cfg = OmegaConf.create({"ckpt_path": metrics["best_checkpoint"], "format": format, "output": None,
                                "outputs_root": str(root), "parity_images": 20, "data": data})  # fmt: skip
        exported[format], exported[f"{format}_parity"] = export_checked(cfg)
    return {"root": root, "run": root / "run", "ckpt": Path(metrics["best_checkpoint"]), "overrides": overrides,
            "data": data, "archive": tree_archive, **exported}  # fmt: skip


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Images as users have them: other sizes, grey, RGBA, palette, JPEG; and one file that is no image."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8), "L").save(folder / "grey.png")
    Image.fromarray(rng.integers(0, 255, (48, 64, 4), dtype=np.uint8), "RGBA").save(folder / "rgba-64x48.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "photo.jpg", quality=90)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).convert("P").save(folder / "palette.png")
    (folder / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (100, 80, 3), dtype=np.uint8)).save(folder / "sub" / "big.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def predict_cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / "predict.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def rows(stdout: str) -> dict[str, list[str]]:
    """The printed table: file → [class 1, p 1, class 2, p 2, ...]."""
    return {line.split()[0]: line.split()[1:] for line in stdout.strip().splitlines()[1:]}


def test_the_checkpoint_describes_its_model_as_plain_data(trained):
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    description = checkpoint["cnnlab"]
    assert description["model"]["_target_"] == "cnnlab.model.SlideCNN" and description["model"]["conv2_kernel"] == 4
    assert description["input_shape"] == [3, 32, 32] and description["classes"] == sorted(CLASSES)
    assert description["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert torch.serialization.get_unsafe_globals_in_checkpoint(trained["ckpt"]) == []


def test_predict_a_folder_of_mixed_images_from_ckpt_onnx_and_pt2(trained, photos):
    tables = {}
    for source in (trained["ckpt"], trained["onnx"], trained["pt2"]):
        done = run_in_process("predict.py", f"ckpt_path={source}", f"inputs={photos}", "top_k=3")
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"skipped {photos / 'notes.txt'}: not an image PIL can read" in done.stderr
        tables[source.suffix] = rows(done.stdout)
    files = {str(photos / name) for name in ("grey.png", "rgba-64x48.png", "photo.jpg", "palette.png", "sub/big.png")}
    assert set(tables[".ckpt"]) == files
    for table in tables.values():
        assert {f: row[0] for f, row in table.items()} == {f: row[0] for f, row in tables[".ckpt"].items()}  # top-1
        for row in table.values():
            probabilities = [float(p) for p in row[1::2]]
            assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)


def test_an_image_is_converted_resized_and_normalised_as_in_training(trained, photos):
    model = load_model(str(trained["ckpt"]), device="cpu")
    (top,) = predict(model, read_images([photos / "rgba-64x48.png"], (3, 32, 32))[1], 8, 10)
    # The same by hand: RGB, 32×32, C×H×W, (x/255 − mean) / std, the network, softmax.
    with Image.open(photos / "rgba-64x48.png") as image:
        pixels = np.asarray(image.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR))
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]))
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    net = build_net(checkpoint["cnnlab"], trained["ckpt"]).eval()
    net.load_state_dict(
        {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    )
    with torch.no_grad():
        expected = torch.softmax(net((x - mean) / std), 1)[0]
    assert [p for _, p in top] == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-6)
    assert top[0][0] == model.classes[int(expected.argmax())]


@pytest.mark.slow  # as a user runs it: a process of its own
def test_predictions_written_to_csv_and_json(trained, photos, tmp_path):
    for name in ("preds.csv", "preds.json"):
        done = predict_cli(
            f"ckpt_path={trained['run']}", f"inputs={photos}/*.png", "top_k=2", f"output={tmp_path / name}"
        )
        assert done.returncode == 0, done.stderr[-2000:]
    with open(tmp_path / "preds.csv") as file:
        table = list(csv.DictReader(file))
    assert [row["file"] for row in table] == [str(photos / n) for n in ("grey.png", "palette.png", "rgba-64x48.png")]
    assert set(table[0]) == {"file", "class_1", "probability_1", "class_2", "probability_2"}
    saved = json.loads((tmp_path / "preds.json").read_text())
    assert [r["top"][0]["class"] for r in saved] == [row["class_1"] for row in table]


def test_export_reloads_with_matching_outputs_in_both_formats(trained):
    for format in ("onnx", "pt2"):
        parity = trained[f"{format}_parity"]
        assert parity.ok and parity.images == 20 and parity.top1_agree == 20 and parity.max_difference < 1e-4
        assert trained[format] == trained["ckpt"].with_suffix(f".{format}")
    import onnx

    exported = onnx.load(str(trained["onnx"]))
    assert exported.opset_import[0].version >= 18  # the opset is recorded in the file
    assert exported.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert exported.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dimension
    assert json.loads({p.key: p.value for p in exported.metadata_props}["cnnlab.json"])["classes"] == sorted(CLASSES)


def test_parity_notices_a_file_that_does_not_match(trained):
    reference = load_model(str(trained["ckpt"]), device="cpu")
    other = load_model(str(trained["onnx"]))
    shifted = Model(other.source, other.description, lambda images: other.run(images)[:, ::-1].copy())
    images = np.random.default_rng(0).integers(0, 255, (10, 3, 32, 32), dtype=np.uint8)
    assert not parity_of(reference, shifted, images, (1, 4)).ok


@pytest.mark.slow
def test_export_cli_writes_the_file_and_reports_parity(trained, tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "src" / "export.py"), f"ckpt_path={trained['ckpt']}", "format=pt2",
         f"output={tmp_path / 'model.pt2'}", "parity_images=8", f"data.root={trained['data'].root}",
         f"data.cache_dir={trained['data'].cache_dir}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        f"wrote {tmp_path / 'model.pt2'}",
        done.stdout.splitlines()[1],
    ] and done.stdout.splitlines()[1].endswith("top-1 agrees on 8 of 8")


def test_evaluate_on_another_image_tree(trained, photos, tmp_path):
    folder = tmp_path / "mine"
    for name, source in (("cat", "grey.png"), ("cat", "photo.jpg"), ("ship", "rgba-64x48.png")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / source).write_bytes((photos / source).read_bytes())
    out = tmp_path / "ev"
    metrics = evaluate(compose_config("eval", [*trained["overrides"], f"ckpt_path={trained['ckpt']}",
                                               f"data.root={folder}", f"output_dir={out}"]))  # fmt: skip
    assert metrics["images"] == 3 and set(k for k in metrics if k.startswith("test/acc_class/")) == {
        "test/acc_class/cat", "test/acc_class/ship"}  # fmt: skip
    confusion = np.array(metrics["confusion_matrix"])
    assert confusion.sum() == 3 and confusion[CLASSES.index("cat")].sum() == 2
    assert metrics["test/acc"] == pytest.approx(np.trace(confusion) / 3)
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_evaluate_the_test_split_matches_training_and_reads_exported_files(trained, tmp_path):
    run_metrics = json.loads((trained["run"] / "metrics.json").read_text())
    for source in (trained["ckpt"], trained["onnx"], trained["pt2"]):
        cfg = compose_config("eval", [*trained["overrides"], f"ckpt_path={source}", f"output_dir={tmp_path / 'e'}"])
        metrics = evaluate(cfg)
        assert metrics["test/acc"] == pytest.approx(run_metrics["test/acc"]) and metrics["images"] == 20
        assert metrics["test/loss"] == pytest.approx(run_metrics["test/loss"], abs=1e-5)


def test_evaluate_runs_on_the_trainers_device(trained, tmp_path, monkeypatch):
    """On a machine with a GPU (faked: torch says CUDA is there), trainer=cpu keeps the evaluation on the CPU."""
    moved_to, to = [], torch.nn.Module.to

    def to_cpu_only(module, device, *args, **kwargs):
        moved_to.append(str(device))
        return to(module, "cpu", *args, **kwargs)  # this machine has no GPU to move it to

    monkeypatch.setattr(torch.nn.Module, "to", to_cpu_only)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    overrides = [*trained["overrides"], f"ckpt_path={trained['ckpt']}", f"output_dir={tmp_path}"]
    cfg = compose_config("eval", overrides)
    assert cfg.trainer.accelerator == "cpu" and evaluate(cfg)["images"] == 20
    assert moved_to == ["cpu"]  # with accelerator auto it would be cuda
    with pytest.raises(UserError, match="trainer.accelerator='tpu' must be one of auto, cpu, gpu, cuda, mps"):
        evaluate(compose_config("eval", [*overrides, "trainer.accelerator=tpu"]))


@BOTH_WAYS
@pytest.mark.parametrize(
    ("tool", "args"),
    [("eval.py", []), ("export.py", ["format=onnx", "output={tmp}/model.onnx"]), ("visualize.py", [])],
)
def test_the_tools_read_the_data_the_model_was_trained_on(tool, args, trained, tmp_path, run_script):
    """No data.root given: the checkpoint's own (a local archive here; the default would try to download)."""
    done = run_script(tool, f"ckpt_path={trained['ckpt']}", f"data.cache_dir={tmp_path}",
                      *[arg.replace("{tmp}", str(tmp_path)) for arg in args], cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    said = [line for line in (done.stdout + done.stderr).splitlines() if "the data the model was trained on" in line]
    assert len(said) == 1 and str(trained["archive"]) in said[0], done.stdout[-2000:] + done.stderr[-2000:]


# ------------------------------------------------------------------------------------------ bad input


@BOTH_WAYS  # as a process too: nothing else on its stderr
def test_nothing_predictable_is_an_error_but_one_bad_file_is_not(trained, photos, tmp_path, run_script):
    only_text = tmp_path / "texts"
    only_text.mkdir()
    (only_text / "a.txt").write_text("hello")
    done = run_script("predict.py", f"ckpt_path={trained['ckpt']}", f"inputs={only_text}")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"skipped {only_text / 'a.txt'}: not an image PIL can read",
        f"error: inputs={only_text}: none of its 1 files is an image that could be read",
    ]


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda t, p: ["inputs=" + str((p / "empty").mkdir() or p / "empty")], r"inputs=.*empty: the folder is empty"),
        (lambda t, p: [f"inputs={p}/*.gif"], r"inputs=.*\*.gif: no such file or folder, and no file matches it"),
        (lambda t, p: [f"ckpt_path={p / 'nope.ckpt'}"], r"ckpt_path=.*nope.ckpt: no such file or run dir"),
        (
            lambda t, p: [f"ckpt_path={write(p / 'x.ckpt', t['ckpt'].read_bytes()[:3000])}"],
            r"not a checkpoint that loads",
        ),
        (lambda t, p: [f"ckpt_path={write(p / 'y.ckpt', b'garbage')}"], r"not a checkpoint that loads safely"),
        (lambda t, p: [f"ckpt_path={saved(p / 'z.ckpt', {'weights': torch.zeros(1)})}"], r"not a Lightning checkpoint"),
        (lambda t, p: [f"ckpt_path={foreign(t, p)}"], r"its model is os.system, not one of cnnlab's; refused"),
        (lambda t, p: [f"ckpt_path={reshaped(t, p)}"], r"its weights do not fit its own model"),
        (lambda t, p: [f"ckpt_path={write(p / 'm.onnx', b'garbage')}"], r"not an ONNX model onnxruntime can load"),
        (lambda t, p: [f"ckpt_path={write(p / 'm.pt2', b'garbage')}"], r"not a torch.export program that loads"),
        (lambda t, p: ["top_k=0"], r"top_k=0 must be an integer ≥ 1"),
    ],
    ids=[
        "empty folder",
        "glob matching nothing",
        "missing",
        "truncated",
        "corrupt",
        "not ours",
        "foreign target",
        "another model",
        "bad onnx",
        "bad pt2",
        "top_k 0",
    ],  # fmt: skip
)
def test_bad_predict_input_gets_one_clear_line(make_args, message, trained, photos, tmp_path):
    args = {"ckpt_path": f"ckpt_path={trained['ckpt']}", "inputs": f"inputs={photos}"}
    for arg in make_args(trained, tmp_path):
        args[arg.split("=", 1)[0]] = arg
    with pytest.raises(UserError, match=message) as error:  # src/predict.py prints it as `error: ...`, exit 1
        predict_files(compose_config("predict", list(args.values())))
    assert "\n" not in str(error.value)


def test_unknown_export_format(trained):
    with pytest.raises(UserError, match="format=tflite: use one of onnx, pt2"):
        export(str(trained["ckpt"]), "tflite", None)


def test_a_missing_export_dependency_names_the_extra(trained, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(UserError, match=r"onnxruntime is not installed: it comes with cnnlab's export extra, pip"):
        load_model(str(trained["onnx"]))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def saved(path: Path, content) -> Path:
    torch.save(content, path)
    return path


def foreign(trained: dict, folder: Path) -> Path:
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    checkpoint["cnnlab"]["model"] = {"_target_": "os.system", "command": "echo hacked"}
    return saved(folder / "foreign.ckpt", checkpoint)


def reshaped(trained: dict, folder: Path) -> Path:
    checkpoint = torch.load(trained["ckpt"], weights_only=True)
    checkpoint["cnnlab"]["model"]["conv1_channels"] = 8
    return saved(folder / "reshaped.ckpt", checkpoint)
