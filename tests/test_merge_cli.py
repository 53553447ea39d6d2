"""`fl-sim merge` end to end, through the command line, on checkpoints made here.

Every merge is checked against docs/design.md's arithmetic worked out independently in float64 from
the input files: θ = θ₀ + β · A(Δ₁..Δ_T) with Δ_t = θ_t − θ₀ and A the rule function of
``strategies`` applied to the stacked task vectors. Task Arithmetic is the claim of the paper:
θ₀ + λ Σ_t τ_t is one-shot FedAvg with p_t = 1/T and β = λT.

Inputs are a tiny BERT classifier saved with ``save_pretrained`` (the base and T = 4 fine-tuned
copies with seeded perturbations) and single ``.safetensors`` files holding an int64 buffer.
Bad input must exit 2 with one ``fl-sim: error:`` line and leave nothing at OUT.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import cclip
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

from fl_sim.cli.main import main
from strategies.fedavg import fedavg
from strategies.fedgma import fedgma
from strategies.fednova import fednova
from strategies.median import median

F64 = torch.float64
NUM_FT = 4  # even, so median's two modes differ
TINY_BERT = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
}
# A different spread per client, so norms, clipping and the median all have something to do.
NOISE_SCALES = (0.004, 0.008, 0.012, 0.03)
# Training metadata of the four clients: K_t and Σ_k η_t⁽ᵏ⁾ (heterogeneous on purpose).
STEPS = (100.0, 200.0, 300.0, 400.0)
LR_SUMS = (0.5, 0.1, 0.3, 0.2)
MERGE_FLAGS = (
    "--method",
    "--base",
    "--out",
    "--lambda",
    "--server-lr",
    "--weights",
    "--a-norm",
    "--train-meta",
    "--rho",
    "--median-mode",
    "--tau-c",
    "--iters",
    "--device",
    "--dtype",
)


@dataclass(frozen=True)
class Models:
    """θ₀ and θ_1..θ_T on disk, as HF folders or as single files."""

    base: Path
    fts: tuple[Path, ...]

    @property
    def paths(self) -> list[str]:
        return [str(p) for p in self.fts]


def weights_file(path: Path) -> Path:
    return path / "model.safetensors" if path.is_dir() else path


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(weights_file(path))


def perturbed(tensors: dict[str, torch.Tensor], scale: float, seed: int) -> dict[str, torch.Tensor]:
    """θ_t = θ₀ + scale · ε on every float tensor (seeded); integer buffers untouched."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (
            t + scale * torch.randn(t.shape, generator=generator, dtype=t.dtype)
            if t.is_floating_point()
            else t.clone()
        )
        for name, t in tensors.items()
    }


pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny tensors: one thread


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """A tiny BertForSequenceClassification θ₀ and T = 4 fine-tuned copies, via save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY_BERT, num_labels=3))
    model.save_pretrained(root / "base")
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fts = []
    for t, scale in enumerate(NOISE_SCALES, start=1):
        model.load_state_dict(perturbed(base_state, scale, seed=100 + t))
        model.save_pretrained(root / f"ft{t}")
        fts.append(root / f"ft{t}")
    return Models(root / "base", tuple(fts))


def file_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "embeddings.position_ids": torch.arange(16, dtype=torch.int64).unsqueeze(0),
        "embeddings.weight": torch.randn(16, 8, generator=generator),
        "encoder.weight": torch.randn(8, 8, generator=generator),
        "encoder.bias": torch.randn(8, generator=generator),
        "head.weight": torch.randn(3, 8, generator=generator),
        "head.bias": torch.zeros(3),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """θ₀ and T = 4 fine-tuned models as single .safetensors files with an int64 buffer."""
    root = tmp_path_factory.mktemp("files")
    base = file_tensors()
    save_file(base, root / "base.safetensors")
    fts = []
    for t, scale in enumerate(NOISE_SCALES, start=1):
        save_file(perturbed(base, 10 * scale, seed=200 + t), root / f"ft{t}.safetensors")
        fts.append(root / f"ft{t}.safetensors")
    return Models(root / "base.safetensors", tuple(fts))


@pytest.fixture(params=["folders", "files"])
def models(request: pytest.FixtureRequest) -> Models:
    return request.getfixturevalue(request.param)


# --- the independent side: float64 arithmetic straight from the files -----------------------


def task_vectors(models: Models) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """θ₀ and the stacked τ_t = θ_t − θ₀ ([T, ...]) of every float tensor, in float64."""
    base = load(models.base)
    fts = [load(p) for p in models.fts]
    theta0 = {n: t.to(F64) for n, t in base.items() if t.is_floating_point()}
    tau = {n: torch.stack([ft[n].to(F64) - theta0[n] for ft in fts]) for n in theta0}
    return theta0, tau


def expected(
    models: Models, beta: float, rule: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """θ₀ + β · A(τ) per tensor, with A a coordinate-wise rule over the stacked task vectors."""
    theta0, tau = task_vectors(models)
    return {n: theta0[n] + beta * rule(tau[n]) for n in theta0}


def uniform(num: int = NUM_FT) -> torch.Tensor:
    return torch.full((num,), 1.0 / num, dtype=F64)


def flat_task_vectors(models: Models) -> torch.Tensor:
    """[T, n]: every float tensor's τ_t concatenated (the federated parameter vector)."""
    _, tau = task_vectors(models)
    return torch.cat([t.flatten(1) for t in tau.values()], dim=1)


def assert_merged(
    out: Path, want: dict[str, torch.Tensor], models: Models, *, rtol=1e-5, atol=1e-6
) -> dict[str, torch.Tensor]:
    """OUT holds ``want`` on float tensors and the base's integer buffers, bit for bit."""
    merged = load(out)
    base = load(models.base)
    assert set(merged) == set(base)
    for name, tensor in merged.items():
        if base[name].is_floating_point():
            torch.testing.assert_close(tensor.to(F64), want[name], rtol=rtol, atol=atol)
        else:
            assert tensor.dtype == base[name].dtype
            assert torch.equal(tensor, base[name]), name
    return merged


# --- running the command line ---------------------------------------------------------------


def output_path(tmp_path: Path, models: Models, name: str = "merged") -> Path:
    folder = tmp_path / "outputs"
    folder.mkdir(exist_ok=True)
    return folder / (name if models.base.is_dir() else f"{name}.safetensors")


def report_of(out: Path) -> dict:
    path = (
        out / "merge_report.json"
        if out.is_dir()
        else out.with_name(f"{out.stem}.merge_report.json")
    )
    return json.loads(path.read_text())


def merge(*argv: object) -> None:
    """``fl-sim merge ARGV`` in this process; it must succeed."""
    assert main(["merge", *map(str, argv), "--no-progress"]) == 0


def merge_models(models: Models, out: Path, *flags: object) -> dict:
    merge(*flags, "--base", models.base, "--out", out, *models.paths)
    return report_of(out)


def assert_refused(
    capsys: pytest.CaptureFixture[str], argv: Sequence[object], out: Path, *needles: str
) -> str:
    """Exit 2, one ``fl-sim: error:`` line naming the problem, no traceback, nothing at OUT."""
    before = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    code = main(["merge", *map(str, argv)])
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fl-sim: error: "), lines[0]
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    after = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
    assert after == before, f"left behind: {sorted(set(after) - set(before))}"
    return lines[0]


# --- 1. Task Arithmetic is one-shot FedAvg ---------------------------------------------------


def test_task_arithmetic_equals_theta0_plus_lambda_sum_of_task_vectors(
    models: Models, tmp_path: Path
) -> None:
    lam = 0.3
    out = output_path(tmp_path, models)
    report = merge_models(models, out, "--method", "task_arithmetic", "--lambda", lam)

    assert_merged(out, expected(models, lam, lambda tau: tau.sum(0)), models)
    flat = flat_task_vectors(models)
    norms = flat.norm(dim=1)
    assert report["method"] == "task_arithmetic"
    assert report["parameters"]["lambda"] == lam
    assert report["parameters"]["server_lr"] == pytest.approx(lam * NUM_FT)  # β = λT
    assert report["weights"] == pytest.approx([1 / NUM_FT] * NUM_FT)
    vectors = report["task_vectors"]
    assert vectors["coordinates"] == flat.shape[1]
    assert vectors["norms"] == pytest.approx(norms.tolist(), rel=1e-6)
    cosines = (flat @ flat.T) / torch.outer(norms, norms)
    np.testing.assert_allclose(vectors["cosine_similarity"], cosines.numpy(), atol=1e-6)
    assert report["seconds"]["merge"] >= 0 and report["seconds"]["total"] >= 0
    assert report["heterogeneity"]["effective_weights"] is None  # no training metadata


def test_task_arithmetic_output_folder_loads_in_transformers(
    folders: Models, tmp_path: Path
) -> None:
    out = output_path(tmp_path, folders)
    merge_models(folders, out, "--method", "task_arithmetic", "--lambda", 0.5, "--device", "cpu")

    assert (out / "config.json").read_text() == (folders.base / "config.json").read_text()
    assert not (out / "fl_sim_meta.json").exists()
    merged = load(out)
    classifier, info = AutoModelForSequenceClassification.from_pretrained(
        out, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in classifier.state_dict().items():
        if name in merged:
            assert torch.equal(tensor, merged[name]), name
    encoder = AutoModel.from_pretrained(out)
    assert torch.equal(
        encoder.embeddings.word_embeddings.weight, merged["bert.embeddings.word_embeddings.weight"]
    )


def test_single_files_give_a_single_file_and_a_sibling_report(
    files: Models, tmp_path: Path
) -> None:
    out = output_path(tmp_path, files)
    merge_models(files, out, "--method", "fedavg")

    assert out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "merged.merge_report.json",
        "merged.safetensors",
    ]
    merged = load(out)
    assert merged["embeddings.position_ids"].dtype == torch.int64  # copied, not averaged
    assert torch.equal(merged["embeddings.position_ids"], torch.arange(16).unsqueeze(0))


def test_installed_console_script_merges(files: Models, tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    console_script = Path(sys.executable).with_name("fl-sim")  # [project.scripts] fl-sim
    argv = ["merge", "--method", "task_arithmetic", "--lambda", "0.4", "--base", str(files.base)]
    done = subprocess.run(
        [str(console_script), *argv, "--out", str(out), *files.paths],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress bar, warnings or tracebacks off a terminal
    assert f"merged {NUM_FT} models with task_arithmetic" in done.stdout
    assert str(out) in done.stdout
    assert_merged(out, expected(files, 0.4, lambda tau: tau.sum(0)), files)


# --- 2. every rule through the CLI equals the rule function ----------------------------------


def test_fedavg_with_weights_and_server_lr(models: Models, tmp_path: Path) -> None:
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    p = weights / weights.sum()
    out = output_path(tmp_path, models)
    report = merge_models(
        models, out, "--method", "fedavg", "--weights", "1,2,3,4", "--server-lr", 0.7
    )

    assert_merged(out, expected(models, 0.7, lambda tau: fedavg(tau, p)), models)
    assert report["weights"] == pytest.approx(p.tolist())
    assert report["parameters"]["server_lr"] == 0.7


def write_json(path: Path, payload: object) -> Path:
    path.write_text(json.dumps(payload))
    return path


def meta_entries() -> list[dict[str, float]]:
    return [{"steps": k, "lr_sum": s} for k, s in zip(STEPS, LR_SUMS, strict=True)]


@pytest.mark.parametrize("a_norm", ["steps", "lr-sum"])
@pytest.mark.parametrize(
    ("source", "layout"),
    [("list", "files"), ("keyed-by-path", "files"), ("fl_sim_meta.json", "folders")],
)
def test_fednova_equals_the_rule_with_training_metadata(
    request: pytest.FixtureRequest, tmp_path: Path, source: str, layout: str, a_norm: str
) -> None:
    models: Models = request.getfixturevalue(layout)
    flags: list[object] = ["--method", "fednova", "--a-norm", a_norm, "--lambda", 0.9]
    if source == "list":
        flags += ["--train-meta", write_json(tmp_path / "meta.json", meta_entries())]
    elif source == "keyed-by-path":
        keyed = dict(zip(reversed(models.paths), reversed(meta_entries()), strict=True))
        flags += ["--train-meta", write_json(tmp_path / "meta.json", keyed)]
    else:
        copies = []
        for path, entry in zip(models.fts, meta_entries(), strict=True):
            copy = Path(shutil.copytree(path, tmp_path / "with_meta" / path.name))
            write_json(copy / "fl_sim_meta.json", entry)
            copies.append(copy)
        models = Models(models.base, tuple(copies))
    out = output_path(tmp_path, models)
    report = merge_models(models, out, *flags)

    a = torch.tensor(STEPS if a_norm == "steps" else LR_SUMS, dtype=F64)
    p = uniform()
    assert_merged(out, expected(models, 0.9, lambda tau: fednova(tau, p, a)), models)  # β = λ
    w = p * a / (p * a).sum()  # docs/design.md's effective weights and χ²(p‖w)
    chi_square = float(((p - w) ** 2 / w).sum())
    heterogeneity = report["heterogeneity"]
    assert heterogeneity["a_norm_kind"] == a_norm
    assert heterogeneity["a_norm"] == pytest.approx(a.tolist())
    assert heterogeneity["effective_weights"] == pytest.approx(w.tolist())
    assert heterogeneity["chi_square"] == pytest.approx(chi_square)
    assert report["rule"]["tau_eff"] == pytest.approx(float((p * a).sum()))
    assert not (out / "fl_sim_meta.json").exists()


@pytest.mark.parametrize(
    ("layout", "rho"), [("folders", 0.6), ("files", 0.0), ("files", 0.6), ("files", 1.0)]
)
def test_fedgma_equals_the_rule_and_its_agreement_histogram(
    request: pytest.FixtureRequest, tmp_path: Path, layout: str, rho: float
) -> None:
    models: Models = request.getfixturevalue(layout)
    out = output_path(tmp_path, models)
    report = merge_models(models, out, "--method", "fedgma", "--rho", rho)

    p = uniform()
    assert_merged(out, expected(models, 1.0, lambda tau: fedgma(tau, p, rho)), models)
    flat = flat_task_vectors(models)
    agreement = (p @ torch.sign(flat)).abs()
    counts, edges = np.histogram(agreement.numpy(), bins=10, range=(0.0, 1.0))
    histogram = report["rule"]["sign_agreement_histogram"]
    assert sum(histogram["counts"]) == flat.shape[1]
    assert histogram["counts"] == counts.tolist()
    assert histogram["bin_edges"] == pytest.approx(edges.tolist())
    assert report["parameters"]["rho"] == rho


@pytest.mark.parametrize("mode", ["mean", "lower"])
def test_median_with_even_t_equals_the_rule(models: Models, tmp_path: Path, mode: str) -> None:
    out = output_path(tmp_path, models)
    report = merge_models(models, out, "--method", "median", "--median-mode", mode, "--lambda", 0.8)

    assert_merged(out, expected(models, 0.8, lambda tau: median(tau, mode)), models)  # β = λ
    _, tau = task_vectors(models)
    ordered = torch.sort(next(iter(tau.values())), dim=0).values  # T = 4: middle rows 1 and 2
    middle = (ordered[1] + ordered[2]) / 2 if mode == "mean" else ordered[1]
    torch.testing.assert_close(median(next(iter(tau.values())), mode), middle)
    assert report["parameters"]["median_mode"] == mode
    assert report["parameters"]["server_lr"] == pytest.approx(0.8)


def test_cclip_with_two_iterations_equals_the_rule(models: Models, tmp_path: Path) -> None:
    norms = flat_task_vectors(models).norm(dim=1)
    tau_c = float(norms.min() + norms.max()) / 2  # some clients clipped, some not
    out = output_path(tmp_path, models)
    report = merge_models(models, out, "--method", "cclip", "--tau-c", tau_c, "--iters", 2)

    theta0, tau = task_vectors(models)
    v = cclip(tau, uniform(), tau_c, iters=2)
    assert_merged(out, {n: theta0[n] + v[n] for n in theta0}, models)
    scales = report["rule"]["clip_scales_per_iteration"]
    assert len(scales) == 2
    assert min(scales[0]) < 1.0 and max(scales[0]) == 1.0
    assert report["parameters"]["tau_c"] == pytest.approx(tau_c)
    assert report["parameters"]["iters"] == 2


def test_dtype_bfloat16_output(files: Models, tmp_path: Path) -> None:
    out32 = output_path(tmp_path, files, "f32")
    out16 = output_path(tmp_path, files, "bf16")
    merge_models(files, out32, "--method", "task_arithmetic", "--lambda", 0.3)
    report = merge_models(
        files, out16, "--method", "task_arithmetic", "--lambda", 0.3, "--dtype", "bfloat16"
    )

    merged32, merged16 = load(out32), load(out16)
    for name, tensor in merged16.items():
        if merged32[name].is_floating_point():
            assert tensor.dtype == torch.bfloat16, name
            assert torch.equal(tensor, merged32[name].to(torch.bfloat16)), name  # math in f32
        else:
            assert tensor.dtype == torch.int64 and torch.equal(tensor, merged32[name])
    assert_merged(out16, expected(files, 0.3, lambda tau: tau.sum(0)), files, rtol=8e-3, atol=1e-3)
    assert report["parameters"]["dtype"] == "bfloat16"


def test_no_stats_gives_the_same_weights_and_no_task_vectors(
    models: Models, tmp_path: Path
) -> None:
    with_stats = output_path(tmp_path, models, "stats")
    no_stats = output_path(tmp_path, models, "no_stats")
    merge_models(models, with_stats, "--method", "task_arithmetic", "--lambda", 0.3)
    merge(
        "--method", "task_arithmetic", "--lambda", 0.3, "--no-stats",
        "--base", models.base, "--out", no_stats, *models.paths,
    )  # fmt: skip

    for name, tensor in load(no_stats).items():  # one engine path: the statistics are a side pass
        assert torch.equal(tensor, load(with_stats)[name]), name
    assert report_of(no_stats)["task_vectors"] is None
    assert_merged(no_stats, expected(models, 0.3, lambda tau: tau.sum(0)), models)


def test_pickled_inputs_are_read_only_with_allow_pickle(
    files: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pickled = tmp_path / "ft1.pt"
    torch.save(load(files.fts[0]), pickled)
    fts = [str(pickled), *files.paths[1:]]
    out = output_path(tmp_path, files, "from_pickle")
    argv = ["--method", "fedavg", "--base", files.base, "--out", out, *fts]
    assert_refused(capsys, argv, out, str(pickled), "--allow-pickle")

    merge(*argv, "--allow-pickle")
    reference = output_path(tmp_path, files, "from_safetensors")
    merge_models(files, reference, "--method", "fedavg")
    for name, tensor in load(out).items():
        assert torch.equal(tensor, load(reference)[name]), name


# --- 3. mergekit-style YAML ------------------------------------------------------------------


def write_yaml(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("layout", "weight", "parameters"),
    [("folders", 0.3, None), ("files", 0.5, {"lambda": 0.6})],  # λ_TA = 0.3 in both
)
def test_yaml_equal_weights_are_task_arithmetics_lambda(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    layout: str,
    weight: float,
    parameters: dict | None,
) -> None:
    models: Models = request.getfixturevalue(layout)
    config = write_yaml(
        tmp_path / "merge.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(models.base),
            "models": [{"model": p, "parameters": {"weight": weight}} for p in models.paths],
            "parameters": parameters,  # mergekit: θ₀ + λ Σ_t w_t τ_t, λ = 1 by default
        },
    )
    out = output_path(tmp_path, models, "from_yaml")
    merge(config, "--out", out)
    flags_out = output_path(tmp_path, models, "from_flags")
    merge_models(models, flags_out, "--method", "task_arithmetic", "--lambda", 0.3)

    assert_merged(out, expected(models, 0.3, lambda tau: tau.sum(0)), models)
    for name, tensor in load(out).items():
        torch.testing.assert_close(tensor, load(flags_out)[name], rtol=1e-6, atol=1e-7)
    report = report_of(out)
    assert report["method"] == "task_arithmetic"
    assert report["parameters"]["lambda"] == pytest.approx(0.3)
    assert report["parameters"]["server_lr"] == pytest.approx(0.3 * NUM_FT)


def test_yaml_unequal_weights_follow_mergekit(folders: Models, tmp_path: Path) -> None:
    w = [0.1, 0.2, 0.3, 0.5]
    config = write_yaml(
        tmp_path / "merge.yaml",
        {
            "merge_method": "task_arithmetic",
            "base_model": str(folders.base),
            "models": [
                {"model": str(folders.base)},  # mergekit configs often list the base, weightless
                *(
                    {"model": path, "parameters": {"weight": weight}}
                    for path, weight in zip(folders.paths, w, strict=True)
                ),
            ],
            "parameters": {"lambda": 2.0},
            "dtype": "float32",
        },
    )
    out = tmp_path / "merged"
    merge(config, "--out", out)

    w64 = torch.tensor(w, dtype=F64)
    want = expected(folders, 2.0, lambda tau: torch.tensordot(w64, tau, dims=1))  # θ₀ + λΣ w_t τ_t
    assert_merged(out, want, folders)
    assert report_of(out)["models"] == folders.paths


def test_yaml_models_without_weights_and_rule_parameters(files: Models, tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "merge.yaml",
        {
            "merge_method": "fedgma",
            "base_model": str(files.base),
            "models": [{"model": p} for p in files.paths[:3]] + [files.paths[3]],
            "parameters": {"lambda": 0.25, "rho": 0.6},
        },
    )
    out = tmp_path / "merged.safetensors"
    merge(config, "--out", out)

    p = uniform()
    want = expected(files, 0.25 * NUM_FT, lambda tau: fedgma(tau, p, 0.6))  # β = λT
    assert_merged(out, want, files)
    assert report_of(out)["parameters"]["rho"] == 0.6


def top_level(key: str, value: object) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        config[key] = value

    return edit


def parameter(key: str, value: object) -> Callable[[dict], None]:
    return top_level("parameters", {key: value})


def first_model_parameters(value: object) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        config["models"][0]["parameters"] = value

    return edit


def drop_out(config: dict) -> None:
    config.pop("out")


BAD_YAML = {
    "unknown-key": (top_level("tokenizer_source", "base"), "unknown key 'tokenizer_source'"),
    "unknown-parameter": (parameter("epsilon", 0.5), "unknown parameter 'epsilon'"),
    "another-rules-parameter": (parameter("density", 0.5), "fedgma has no knob 'density'"),
    "unknown-model-parameter": (first_model_parameters({"epsilon": 0.5}), "'epsilon'"),
    "weight-not-a-number": (first_model_parameters({"weight": [0, 1]}), "weight of"),
    "rho-not-a-number": (parameter("rho", "high"), "'rho' must be a number, got 'high'"),
    "lambda-a-list": (parameter("lambda", [0.1, 0.2]), "'lambda' must be a number"),
    "iters-a-fraction": (parameter("iters", 1.5), "'iters' must be an integer"),
    "unknown-method": (top_level("merge_method", "fedprox"), "'fedprox'"),
    "no-out": (drop_out, "--out"),
    "empty": (lambda config: config.clear(), "merge_method"),
}


@pytest.mark.parametrize("case", list(BAD_YAML))
def test_yaml_bad_keys_are_one_line_errors(
    files: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    edit, needle = BAD_YAML[case]
    out = tmp_path / "outputs" / "merged.safetensors"
    out.parent.mkdir()
    config = {
        "merge_method": "fedgma",
        "base_model": str(files.base),
        "models": [{"model": p} for p in files.paths],
        "out": str(out),
    }
    edit(config)
    assert_refused(capsys, [write_yaml(tmp_path / "merge.yaml", config)], out, needle)


# --- 4. bad input: exit 2, one line, nothing at OUT ------------------------------------------


def edited(files: Models, tmp_path: Path, edit: Callable[[dict], None], name="bad") -> str:
    """A copy of ft1 with ``edit`` applied to its tensors."""
    tensors = load(files.fts[0])
    edit(tensors)
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, path)
    return str(path)


def poison(value: float) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        tensors["encoder.weight"][2, 3] = value

    return edit


def bad_ft(edit: Callable[[dict], None]) -> Callable[[Models, Path], list[object]]:
    """Flags that merge a corrupted ft1 with the others."""

    def argv(files: Models, tmp_path: Path) -> list[object]:
        bad = edited(files, tmp_path, edit)
        return ["--method", "fedavg", "--base", files.base, bad, *files.paths[1:]]

    return argv


def flags(*extra: object, fts: int = NUM_FT) -> Callable[[Models, Path], list[object]]:
    def argv(files: Models, tmp_path: Path) -> list[object]:
        return [*extra, "--base", files.base, *files.paths[:fts]]

    return argv


def with_meta(text: str, *extra: object) -> Callable[[Models, Path], list[object]]:
    """Flags that merge every model with fednova and a --train-meta file holding ``text``."""

    def argv(files: Models, tmp_path: Path) -> list[object]:
        meta = tmp_path / "meta.json"
        meta.write_text(text)
        extra_flags = [*extra, "--base", files.base, *files.paths]
        return ["--method", "fednova", "--train-meta", meta, *extra_flags]

    return argv


def add_tensor(tensors: dict) -> None:
    tensors["extra.weight"] = torch.ones(2)


def drop_tensor(tensors: dict) -> None:
    del tensors["head.bias"]


def reshape(tensors: dict) -> None:
    tensors["head.weight"] = torch.zeros(4, 8)


def half(tensors: dict) -> None:
    tensors["encoder.bias"] = tensors["encoder.bias"].half()


def shift_buffer(tensors: dict) -> None:
    tensors["embeddings.position_ids"] = tensors["embeddings.position_ids"] + 1


BAD_INPUTS = {
    "extra-key": (bad_ft(add_tensor), ["'extra.weight'", "the base lacks"]),
    "missing-key": (bad_ft(drop_tensor), ["'head.bias'", "lacks"]),
    "shape": (bad_ft(reshape), ["'head.weight'", "shape [4, 8]"]),
    "dtype": (bad_ft(half), ["'encoder.bias'", "torch.float16"]),
    "int-buffer-differs": (bad_ft(shift_buffer), ["'embeddings.position_ids'"]),
    "nan": (bad_ft(poison(math.nan)), ["bad.safetensors", "'encoder.weight'", "NaN"]),
    "inf": (bad_ft(poison(math.inf)), ["bad.safetensors", "'encoder.weight'", "Inf"]),
    "-inf-no-stats": (
        lambda f, p: [*bad_ft(poison(-math.inf))(f, p), "--no-stats"],
        ["bad.safetensors", "'encoder.weight'", "Inf"],
    ),
    "missing-file": (
        lambda f, p: ["--method", "fedavg", "--base", f.base, p / "nowhere.safetensors", f.fts[1]],
        ["nowhere.safetensors", "does not exist"],
    ),
    "missing-base": (
        lambda f, p: ["--method", "fedavg", "--base", p / "no_base", *f.paths],
        ["no_base", "does not exist"],
    ),
    "rho-above-1": (flags("--method", "fedgma", "--rho", 1.5), ["rho", "1.5"]),
    "rho-below-0": (flags("--method", "fedgma", "--rho", -0.1), ["rho", "-0.1"]),
    "tau_c-zero": (flags("--method", "cclip", "--tau-c", 0), ["needs tau-c > 0", "--tau-c"]),
    "tau_c-negative": (flags("--method", "cclip", "--tau-c", -1), ["tau-c must be > 0", "--tau-c"]),
    "cclip-no-tau_c": (flags("--method", "cclip"), ["--tau-c"]),
    "iters-zero": (flags("--method", "cclip", "--tau-c", 1, "--iters", 0), ["iters"]),
    "one-model": (flags("--method", "fedavg", fts=1), ["at least 2", "got 1"]),
    "fednova-no-steps": (flags("--method", "fednova"), ["fednova", "--train-meta"]),
    "lambda-and-server-lr": (
        flags("--method", "task_arithmetic", "--lambda", 0.3, "--server-lr", 1),
        ["--lambda", "--server-lr"],
    ),
    "meta-not-json": (with_meta('[{"steps": 10'), ["meta.json", "not valid JSON"]),
    "meta-wrong-count": (with_meta('[{"steps": 10}]'), ["1 entries for 4 models"]),
    "meta-not-a-list": (with_meta("42"), ["expected a list"]),
    "meta-negative-steps": (
        with_meta(json.dumps([{"steps": -1}] * NUM_FT), "--a-norm", "steps"),
        ["steps", "> 0", "-1"],
    ),
    "meta-missing-key": (
        with_meta(json.dumps([{"steps": 10}] * NUM_FT)),
        ["'lr_sum'", "--train-meta"],
    ),
    "meta-unknown-key": (
        with_meta(json.dumps([{"stepz": 10}] * NUM_FT)),
        ["unknown key 'stepz'"],
    ),
    "no-method": (flags(), ["missing --method"]),
    "meta-missing-file": (
        lambda f, p: ["--method", "fednova", "--train-meta", p / "absent.json", *flags()(f, p)],
        ["absent.json", "does not exist"],
    ),
    "weights-count": (flags("--method", "fedavg", "--weights", "1,2,3"), ["3 weights", "4"]),
    "weights-not-numbers": (flags("--method", "fedavg", "--weights", "1,x,3,4"), ["--weights"]),
    "weights-negative": (flags("--method", "fedavg", "--weights", "1,-2,3,4"), ["weights"]),
    "weights-with-task-arithmetic": (
        flags("--method", "task_arithmetic", "--weights", "1,2,3,4"),
        ["task_arithmetic", "weights"],
    ),
    "lambda-not-finite": (flags("--method", "fedavg", "--lambda", "inf"), ["--lambda", "inf"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_leaves_nothing(
    files: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    build, needles = BAD_INPUTS[case]
    argv = build(files, tmp_path)
    out = tmp_path / "outputs" / "merged.safetensors"
    out.parent.mkdir()
    assert_refused(capsys, [*argv, "--out", out], out, *needles)


def test_bad_input_in_a_folder_merge_leaves_no_folder(
    folders: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "bert.encoder.layer.1.output.dense.weight"
    bad = Path(shutil.copytree(folders.fts[2], tmp_path / "ft3_nan"))
    tensors = load(bad)
    tensors[name][0, 5] = math.nan
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "outputs" / "merged"
    out.parent.mkdir()
    fts = [*folders.paths[:2], str(bad), folders.paths[3]]
    argv = ["--method", "median", "--base", folders.base, "--out", out, *fts]
    assert_refused(capsys, argv, out, "ft3_nan", repr(name), "NaN")


def test_nan_in_the_base_is_named(
    files: Models, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = load(files.base)
    poison(math.nan)(tensors)
    base = tmp_path / "base_nan.safetensors"
    save_file(tensors, base)
    out = tmp_path / "outputs" / "merged.safetensors"
    out.parent.mkdir()
    argv = ["--method", "fedavg", "--base", base, "--out", out, *files.paths]
    assert_refused(capsys, argv, out, "base_nan.safetensors", "'encoder.weight'", "NaN")


@pytest.mark.parametrize("layout", ["folders", "files"])
def test_existing_out_is_kept_unless_force(
    request: pytest.FixtureRequest, tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str
) -> None:
    models: Models = request.getfixturevalue(layout)
    out = output_path(tmp_path, models)
    if models.base.is_dir():
        out.mkdir()
        (out / "old.txt").write_text("keep me")
    else:
        out.write_text("keep me")
    argv = ["--method", "task_arithmetic", "--lambda", 0.3, "--base", models.base, "--out", out]
    assert_refused(capsys, [*argv, *models.paths], out, str(out), "already exists", "--force")
    kept = out / "old.txt" if out.is_dir() else out
    assert kept.read_text() == "keep me"

    merge(*argv, "--force", *models.paths)
    assert_merged(out, expected(models, 0.3, lambda tau: tau.sum(0)), models)
    assert not (out / "old.txt").exists()
    assert report_of(out)["method"] == "task_arithmetic"
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


# --- 5. help -----------------------------------------------------------------------------------


def test_help_lists_every_merge_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as top:
        main(["--help"])
    assert top.value.code == 0
    assert "merge" in capsys.readouterr().out

    with pytest.raises(SystemExit) as sub:
        main(["merge", "--help"])
    assert sub.value.code == 0
    text = capsys.readouterr().out
    missing = [flag for flag in MERGE_FLAGS if flag not in text]
    assert missing == []
    for method in ("task_arithmetic", "fedavg", "fednova", "fedgma", "median", "cclip"):
        assert method in text
