"""Local model folders (hf:PATH, clip:PATH) and local data files as task suites, all offline.

Every model here is a tiny random one that the test saves to a temporary folder with a tokenizer
built offline; every data file is generated. Claims: each spec loads and forwards; CLIP gives the
paper's setting (image tower federated, frozen zero-shot heads from class-name prompts); local
CSV/JSONL tasks load with disjoint splits; bad inputs fail with one line naming the fix.
"""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clients.knobs import TrainingKnobs
from clients.local_training import fine_tune
from fl_sim.errors import CheckpointError, ConfigError
from fl_sim.suites.base import SPLITS, federated_state, load_federated_state
from fl_sim.suites.encoders import CLIP_TEMPLATE, load_pretrained, parse_model_spec
from fl_sim.suites.local_data import read_local_task
from fl_sim.suites.registry import make_suite

WORDS = "a photo of the cat dog red blue square circle . return list files open"


pytestmark = pytest.mark.usefixtures("module_one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random BERT, CLIP and ViT folders, each with what it needs to load offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizer,
        CLIPConfig,
        CLIPModel,
        PreTrainedTokenizerFast,
        ViTConfig,
        ViTModel,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    small = {"intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}

    bert_vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS.split(" ")]
    bert_config = BertConfig(vocab_size=len(bert_vocab), hidden_size=16, **small)
    BertModel(bert_config).save_pretrained(root / "bert")
    BertTokenizer(vocab={w: i for i, w in enumerate(bert_vocab)}).save_pretrained(root / "bert")

    # CLIP's tokenizer: a word-level one that wraps text in <bos> ... <eos>, as CLIP's does
    clip_vocab = {
        w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>", "<eos>", *WORDS.split(" ")])
    }
    words = Tokenizer(models.WordLevel(clip_vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation
    words.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    clip_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    clip_config = CLIPConfig(
        text_config={
            "vocab_size": len(clip_vocab),
            "hidden_size": 16,
            "max_position_embeddings": 16,
            "bos_token_id": 2,
            "eos_token_id": 3,
            "pad_token_id": 0,
            **small,
        },
        vision_config={"hidden_size": 16, "image_size": 16, "patch_size": 8, **small},
        projection_dim=8,
    )
    CLIPModel(clip_config).save_pretrained(root / "clip")
    clip_tokenizer.save_pretrained(root / "clip")

    vit_config = ViTConfig(hidden_size=16, image_size=16, patch_size=8, **small)
    ViTModel(vit_config).save_pretrained(root / "vit")
    (root / "empty").mkdir()
    return root


def shape_image(shape: str, colour: str, rng: np.random.Generator) -> np.ndarray:
    """A 16×16 RGB uint8 image: a red or blue square or circle at a random place, noisy."""
    yy, xx = np.mgrid[:16, :16]
    cy, cx, r = rng.integers(5, 11), rng.integers(5, 11), rng.integers(3, 5)
    if shape == "square":
        inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    else:
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    image = rng.integers(0, 40, size=(16, 16, 3))
    image[inside, 0 if colour == "red" else 2] = 220
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def image_tasks(tmp_path_factory):
    """Two image tasks: shape (a CSV of .npy paths) and colour (JSONL of nested pixel lists)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "pixels").mkdir()
    lines = ["image,label"]
    for i in range(30):
        shape, colour = ("square", "circle")[i % 2], ("red", "blue")[(i // 2) % 2]
        np.save(root / "pixels" / f"{i}.npy", shape_image(shape, colour, rng))
        lines.append(f"pixels/{i}.npy,{shape}")
    (root / "shape.csv").write_text("\n".join(lines) + "\n")
    with (root / "colour.jsonl").open("w") as handle:
        for i in range(30):
            colour = ("red", "blue")[i % 2]
            pixels = shape_image("circle", colour, rng).transpose(2, 0, 1) / 255.0
            handle.write(json.dumps({"image": pixels.round(3).tolist(), "label": colour}) + "\n")
    return [root / "shape.csv", root / "colour.jsonl"]


@pytest.fixture(scope="module")
def text_tasks_on_disk(tmp_path_factory):
    """Text tasks: one CSV file, and a folder of train/test JSONL files with other column names."""
    root = tmp_path_factory.mktemp("texts")
    rng = np.random.default_rng(1)
    rows = ["text,label"]
    for i in range(40):
        animal = ("cat", "dog")[i % 2]
        rows.append(
            f"a photo of the {animal} {' '.join(rng.choice(WORDS.split(' ')[:8], 3))} {i},{animal}"
        )
    (root / "animals.csv").write_text("\n".join(rows) + "\n")
    (root / "verbs").mkdir()
    for split, n in (("train", 30), ("test", 10)):
        with (root / "verbs" / f"{split}.jsonl").open("w") as handle:
            for i in range(n):
                verb = ("open", "return")[i % 3 == 0]
                sentence = f"{verb} the files list {split} {i}"
                handle.write(json.dumps({"sentence": sentence, "y": verb}) + "\n")
    return root


def test_hf_path_text_model_is_a_text_suite_backbone(folders):
    suite = make_suite(
        "text", model=f"hf:{folders / 'bert'}", train_per_class=6, eval_per_class=3,
        federated_layers=1,
    )  # fmt: skip
    model = suite.build_model()
    state = federated_state(model)
    assert state and all(name.startswith("backbone.encoder.layer.1.") for name in state)
    x, _ = suite.tasks[0].split("val")
    logits = model(x, 0)
    assert logits.shape == (len(x), suite.tasks[0].num_classes) and torch.isfinite(logits).all()

    knobs = TrainingKnobs(lr=1e-2, local_steps=2, optimizer="adamw", batch_size=4)
    update = fine_tune(suite, 1, state, knobs, round_index=1).update
    assert set(update) == set(state) and any(d.abs().max() > 0 for d in update.values())
    moved = {name: state[name] + update[name] for name in state}
    load_federated_state(model, moved)
    torch.testing.assert_close(
        model.encoder.model.encoder.layer[1].output.dense.weight,
        moved["backbone.encoder.layer.1.output.dense.weight"],
    )


def test_clip_path_gives_the_papers_setting(folders, image_tasks):
    suite = make_suite("local", paths=image_tasks, model=f"clip:{folders / 'clip'}")
    assert [task.name for task in suite.tasks] == ["shape", "colour"]
    assert suite.class_names == [("circle", "square"), ("blue", "red")]
    model = suite.build_model()
    state = federated_state(model)
    # the whole image tower and its projection are federated; nothing of the text tower is
    assert "backbone.visual_projection.weight" in state
    assert "backbone.vision_model.embeddings.patch_embedding.weight" in state
    assert not any("text" in name for name in state)
    vision_numel = sum(p.numel() for p in model.encoder.parameters())
    assert sum(t.numel() for t in state.values()) == vision_numel

    # zero-shot heads: exp(logit_scale) · normalised text features of "a photo of a {c}."
    clip = load_pretrained(f"clip:{folders / 'clip'}")
    from transformers import AutoTokenizer, CLIPModel

    reference = CLIPModel.from_pretrained(str(folders / "clip"), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folders / "clip"), local_files_only=True)
    prompts = [CLIP_TEMPLATE.format(c=c) for c in ("circle", "square")]
    with torch.no_grad():
        text = reference.get_text_features(**tokenizer(prompts, return_tensors="pt"))
        text = getattr(text, "pooler_output", text)
        expected = reference.logit_scale.exp() * F.normalize(text, dim=-1)
    torch.testing.assert_close(model.heads[0].weight, expected)
    assert model.heads[0].bias is None
    norms = model.heads[1].weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, math.exp(2.6592)), rtol=1e-4, atol=0)

    # forward generated images of the config's size (and another size, resized)
    images = [torch.rand(3, 16, 16), torch.rand(1, 24, 24)]
    x = clip.prepare(images)
    assert x.shape == (2, 3, 16, 16)
    assert model(x, 0).shape == (2, 2)
    with torch.no_grad():
        image = reference.get_image_features(pixel_values=x)
        image = getattr(image, "pooler_output", image)
    torch.testing.assert_close(model(x, 0), F.normalize(image, dim=-1) @ expected.T)
    knobs = TrainingKnobs(lr=1e-3, local_steps=1, optimizer="adamw", batch_size=8)
    update = fine_tune(suite, 0, state, knobs, round_index=1).update
    assert any(d.abs().max() > 0 for d in update.values())


def test_hf_path_vision_model_takes_image_tasks_with_probe_heads(folders, image_tasks):
    suite = make_suite("local", paths=image_tasks[:1], model=f"hf:{folders / 'vit'}")
    model = suite.build_model()
    names = {name.split(".")[1] for name in federated_state(model)}
    assert names == {"layers", "layernorm", "pooler"}  # top layer and what follows it
    x, y = suite.tasks[0].split("test")
    assert model(x, 0).shape == (len(y), 2)


def test_local_csv_and_jsonl_text_tasks_load_with_disjoint_splits(folders, text_tasks_on_disk):
    paths = [text_tasks_on_disk / "animals.csv", text_tasks_on_disk / "verbs"]
    kwargs = {"text_column": "sentence", "label_column": "y"}
    animals, modality = read_local_task(paths[0], seed=0)
    verbs, _ = read_local_task(paths[1], seed=0, **kwargs)
    assert modality == "text" and animals.classes == ("cat", "dog")
    assert verbs.name == "verbs" and verbs.classes == ("open", "return")
    assert {s: len(animals.labels[s]) for s in SPLITS} == {"train": 24, "val": 8, "test": 8}
    assert {s: len(verbs.labels[s]) for s in SPLITS} == {"train": 24, "val": 6, "test": 10}
    for task in (animals, verbs):
        seen = [set(task.inputs[s]) for s in SPLITS]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    again, _ = read_local_task(paths[0], seed=0)
    assert again.inputs == animals.inputs

    with pytest.raises(ConfigError, match=r"no text column 'text'.*sentence, y"):
        make_suite("local", paths=paths, model=f"hf:{folders / 'bert'}")
    (text_tasks_on_disk / "verbs2").mkdir()
    for split in ("train", "test"):
        rows = (text_tasks_on_disk / "verbs" / f"{split}.jsonl").read_text().splitlines()
        (text_tasks_on_disk / "verbs2" / f"{split}.jsonl").write_text(
            "\n".join(r.replace('"sentence"', '"text"').replace('"y"', '"label"') for r in rows)
        )
    suite = make_suite(
        "local", paths=[paths[0], text_tasks_on_disk / "verbs2"], model=f"hf:{folders / 'bert'}"
    )
    assert [task.name for task in suite.tasks] == ["animals", "verbs2"]
    assert suite.build_model()(suite.tasks[1].test_x, 1).shape == (10, 2)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_models_and_data_fail_in_one_line(folders, image_tasks, text_tasks_on_disk, tmp_path):
    with pytest.raises(ConfigError, match="unknown model spec 'gpt'") as error:
        parse_model_spec("gpt")
    one_line(error)
    with pytest.raises(ConfigError, match="no folder at") as error:
        parse_model_spec(f"hf:{tmp_path / 'missing'}")
    one_line(error)
    with pytest.raises(CheckpointError, match=r"has no config.json.*save_pretrained") as error:
        parse_model_spec(f"hf:{folders / 'empty'}")
    one_line(error)
    with pytest.raises(ConfigError, match=r"needs a CLIP folder.*'bert'") as error:
        load_pretrained(f"clip:{folders / 'bert'}")
    one_line(error)
    with pytest.raises(ConfigError, match=r"tasks are image but model .* takes text") as error:
        make_suite("local", paths=image_tasks, model=f"hf:{folders / 'bert'}")
    one_line(error)
    with pytest.raises(ConfigError, match="needs a text model") as error:
        make_suite("text", model=f"clip:{folders / 'clip'}")
    one_line(error)

    (tmp_path / "nolabel.csv").write_text("text,target\nhello,1\n")
    with pytest.raises(ConfigError, match=r"no label column 'label'.*set label_column=") as error:
        make_suite("local", paths=[tmp_path / "nolabel.csv"], model="minilm")
    one_line(error)
    with pytest.raises(ConfigError, match="does not exist") as error:
        make_suite("local", paths=[tmp_path / "nowhere.csv"])
    one_line(error)
    with pytest.raises(ConfigError, match="give paths="):
        make_suite("local", paths=[])
    with pytest.raises(ConfigError, match="num_tasks=3 but 2 task paths"):
        make_suite("local", num_tasks=3, paths=image_tasks, model=f"clip:{folders / 'clip'}")
    unknown = tmp_path / "animals.jsonl"
    rows = [{"image": [[0.1 * i] * 4] * 4, "label": ("zebra", "lion")[i % 2]} for i in range(10)]
    unknown.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(ConfigError, match="identical zero-shot heads") as error:
        make_suite("local", paths=[unknown], model=f"clip:{folders / 'clip'}").build_model()
    one_line(error)
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ConfigError, match="pip install datasets") as error:
            make_suite("local", paths=[tmp_path / "saved"])
        one_line(error)
