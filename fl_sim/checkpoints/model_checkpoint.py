"""Base and fine-tuned checkpoints, read lazily one tensor at a time, and atomic merge outputs.

A checkpoint is a Hugging Face folder (``model.safetensors`` or a sharded
``model.safetensors.index.json``), or a single ``.safetensors`` file. Pickled weights
(``pytorch_model.bin``, ``*.pt``, ``*.pth``) are refused unless ``allow_pickle`` is set, and then
read with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from types import TracebackType

import torch

from fl_sim.checkpoints.safetensors_io import SafetensorsFile
from fl_sim.errors import CheckpointError, ConfigError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.index.json",
    # Weights of other frameworks: copying the base's would put stale weights next to the merge.
    "*.h5",
    "*.msgpack",
    "*.ckpt",
    "*.gguf",
    "*.onnx",
    "fl_sim_meta.json",
)
# Pickles a transformers Trainer writes next to the weights; never model weights themselves.
TRAINER_STATE_PATTERNS = (
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
)


class Checkpoint:
    """A model's tensors by name; ``get`` reads one tensor (a zero-copy view when it can).

    Returned tensors are read-only views into a memory map: copy before modifying them.
    """

    def __init__(
        self,
        path: Path,
        *,
        is_folder: bool,
        files: Sequence[SafetensorsFile] = (),
        tensor_files: dict[str, SafetensorsFile] | None = None,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Use ``open_checkpoint``; give either ``files`` + ``tensor_files`` or ``state_dict``."""
        self.path = path
        self.is_folder = is_folder
        self._files = list(files)
        self._tensor_files = tensor_files or {}
        self._state_dict = state_dict or {}

    def keys(self) -> list[str]:
        """Tensor names: file order for safetensors (shard by shard), dict order for pickles."""
        return list(self._tensor_files) + list(self._state_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, name: object) -> bool:
        return name in self._tensor_files or name in self._state_dict

    def __len__(self) -> int:
        return len(self._tensor_files) + len(self._state_dict)

    def dtype(self, name: str) -> torch.dtype:
        if name in self._state_dict:
            return self._state_dict[name].dtype
        return self._file(name).dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._state_dict:
            return tuple(self._state_dict[name].shape)
        return self._file(name).shape(name)

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read-only."""
        if name in self._state_dict:
            return self._state_dict[name]
        return self._file(name).get(name)

    def release(self, name: str) -> None:
        """Let go of the memory-mapped pages of ``name`` (see ``SafetensorsFile.release``)."""
        if name in self._tensor_files:
            self._tensor_files[name].release(name)

    @property
    def nbytes(self) -> int:
        """Total bytes of all tensors."""
        return sum(math.prod(self.shape(name)) * self.dtype(name).itemsize for name in self.keys())

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._tensor_files[name]
        except KeyError:
            raise KeyError(f"checkpoint {self.path} has no tensor {name!r}") from None

    def close(self) -> None:
        for file in self._files:
            file.close()
        self._state_dict = {}

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"


def open_checkpoint(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Checkpoint:
    """Open a HF folder, a sharded index, or a single weights file, reading headers only."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist (check the path)")
    if path.is_dir():
        return _open_folder(path, allow_pickle=allow_pickle)
    if path.name.endswith(".safetensors.index.json"):
        return _open_safetensors_index(path, is_folder=False)
    if path.suffix == ".safetensors":
        file = SafetensorsFile(path)
        return Checkpoint(
            path, is_folder=False, files=[file], tensor_files=dict.fromkeys(file.keys(), file)
        )
    if path.name.endswith(".bin.index.json") or path.suffix in PICKLE_SUFFIXES:
        return _open_pickled(path, is_folder=False, allow_pickle=allow_pickle)
    raise CheckpointError(
        f"checkpoint {path} is not a safetensors file, a sharded index or a model folder "
        "(pass a Hugging Face model folder or a .safetensors file)"
    )


def _open_folder(folder: Path, *, allow_pickle: bool) -> Checkpoint:
    if (folder / "model.safetensors").is_file():
        file = SafetensorsFile(folder / "model.safetensors")
        return Checkpoint(
            folder, is_folder=True, files=[file], tensor_files=dict.fromkeys(file.keys(), file)
        )
    if (folder / SAFETENSORS_INDEX).is_file():
        return _open_safetensors_index(folder / SAFETENSORS_INDEX, is_folder=True)
    if (folder / "adapter_config.json").is_file():
        raise CheckpointError(
            f"checkpoint {folder} is a PEFT adapter, not a full model (fl-sim merge takes it "
            "as one of the models, with its base as --base)"
        )
    safetensors = sorted(folder.glob("*.safetensors"))
    if len(safetensors) == 1:
        file = SafetensorsFile(safetensors[0])
        return Checkpoint(
            folder, is_folder=True, files=[file], tensor_files=dict.fromkeys(file.keys(), file)
        )
    if len(safetensors) > 1:
        raise CheckpointError(
            f"checkpoint {folder} holds {len(safetensors)} .safetensors files but no "
            f"{SAFETENSORS_INDEX} (pass one of the files, or add the index)"
        )
    if (folder / PICKLE_INDEX).is_file():
        return _open_pickled(folder / PICKLE_INDEX, is_folder=True, allow_pickle=allow_pickle)
    pickles = sorted(
        path
        for path in folder.iterdir()
        if path.suffix in PICKLE_SUFFIXES
        and path.is_file()
        and not any(fnmatch(path.name, pattern) for pattern in TRAINER_STATE_PATTERNS)
    )
    if (folder / "pytorch_model.bin").is_file():
        pickles = [folder / "pytorch_model.bin"]
    if len(pickles) == 1:
        return _open_pickled(pickles[0], is_folder=True, allow_pickle=allow_pickle)
    if len(pickles) > 1:
        names = ", ".join(p.name for p in pickles)
        raise CheckpointError(
            f"checkpoint {folder} holds several pickled files ({names}) and no model weights "
            "fl-sim can tell apart (pass the weights file itself)"
        )
    if not any(folder.iterdir()):
        raise CheckpointError(f"checkpoint {folder} is an empty folder (check the path)")
    raise CheckpointError(
        f"checkpoint {folder} holds no model.safetensors or {SAFETENSORS_INDEX} "
        "(pass a Hugging Face model folder saved with save_pretrained)"
    )


def _read_weight_map(index: Path) -> dict[str, Path]:
    """The index's tensor name -> shard path, every shard checked to exist inside the folder."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"checkpoint index {index} is unreadable ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no weight_map'}; re-save the model)"
        ) from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) and isinstance(shard, str) for name, shard in weight_map.items()
    ):
        raise CheckpointError(
            f"checkpoint index {index}: weight_map must map tensor names to shard files "
            "(re-save the model)"
        )
    folder = index.parent.resolve()
    shards: dict[str, Path] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = (folder / shard).resolve()
        if not shard_path.is_relative_to(folder):
            raise CheckpointError(
                f"checkpoint index {index} points outside its folder ({shard!r}; re-save the model)"
            )
        if not shard_path.is_file():
            raise CheckpointError(
                f"checkpoint index {index} names shard {shard!r}, which is missing "
                "(re-download the model; every shard must sit next to the index)"
            )
        shards[shard] = shard_path
    return {name: shards[shard] for name, shard in weight_map.items()}


def _open_safetensors_index(index: Path, *, is_folder: bool) -> Checkpoint:
    weight_map = _read_weight_map(index)
    files: list[SafetensorsFile] = []
    tensor_files: dict[str, SafetensorsFile] = {}
    try:
        for shard_path in sorted(set(weight_map.values())):
            file = SafetensorsFile(shard_path)
            files.append(file)
            for name in file:
                if weight_map.get(name) == shard_path:
                    tensor_files[name] = file
        missing = next((name for name in weight_map if name not in tensor_files), None)
        if missing is not None:
            raise CheckpointError(
                f"checkpoint index {index} puts tensor {missing!r} in shard "
                f"{weight_map[missing].name}, which lacks it (re-download the model)"
            )
    except BaseException:
        for file in files:
            file.close()
        raise
    path = index.parent if is_folder else index
    return Checkpoint(path, is_folder=is_folder, files=files, tensor_files=tensor_files)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            # Files saved before torch 1.6 (not zip) cannot be memory-mapped.
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        # torch's weights_only message opens with advice to pass weights_only=False, which is
        # exactly what we must not do; the actual reason follows "WeightsUnpickler error:".
        message = str(err).split("WeightsUnpickler error:")[-1]
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        reason = lines[0][:200] if lines else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded with torch.load(weights_only=True) ({reason}; "
            "convert it to safetensors)"
        ) from None
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(loaded).__name__}, not a state dict "
            "(save model.state_dict() instead)"
        )
    for name, tensor in loaded.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {path}: entry {name!r} is a {type(tensor).__name__}, not a tensor "
                "(save a flat model.state_dict(), e.g. checkpoint['state_dict'])"
            )
    return loaded


def _open_pickled(path: Path, *, is_folder: bool, allow_pickle: bool) -> Checkpoint:
    if not allow_pickle:
        where = path.parent if is_folder else path
        raise CheckpointError(
            f"checkpoint {where} is a pickled file ({path.name}): fl-sim reads safetensors only; "
            "convert it, or pass --allow-pickle to load it with torch.load(weights_only=True)"
        )
    if path.name.endswith(".index.json"):
        state_dict: dict[str, torch.Tensor] = {}
        weight_map = _read_weight_map(path)
        for shard_path in sorted(set(weight_map.values())):
            shard = _torch_load(shard_path)
            state_dict.update(
                (name, tensor)
                for name, tensor in shard.items()
                if weight_map.get(name) == shard_path
            )
        missing = next((name for name in weight_map if name not in state_dict), None)
        if missing is not None:
            raise CheckpointError(
                f"checkpoint index {path} puts tensor {missing!r} in shard "
                f"{weight_map[missing].name}, which lacks it (re-download the model)"
            )
        return Checkpoint(
            path.parent if is_folder else path, is_folder=is_folder, state_dict=state_dict
        )
    return Checkpoint(
        path.parent if is_folder else path, is_folder=is_folder, state_dict=_torch_load(path)
    )


def check_compatible(base: Checkpoint, others: Sequence[Checkpoint]) -> list[str]:
    """Check every checkpoint has the base's tensor names, shapes and dtypes; return base order."""
    names = base.keys()
    base_names = set(names)
    for other in others:
        other_names = other.keys()
        missing = [name for name in names if name not in other]
        unexpected = [name for name in other_names if name not in base_names]
        if missing or unexpected:
            parts = []
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                parts.append(f"lacks tensor {missing[0]!r}{more} that the base has")
            if unexpected:
                more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
                parts.append(f"has tensor {unexpected[0]!r}{more} that the base lacks")
            raise CheckpointError(
                f"checkpoint {other.path} {', and '.join(parts)} (base: {base.path}; merge only "
                "models fine-tuned from the same base, with the same architecture)"
            )
        for name in names:
            if other.shape(name) != base.shape(name):
                raise CheckpointError(
                    f"checkpoint {other.path}: tensor {name!r} has shape {list(other.shape(name))} "
                    f"but the base has {list(base.shape(name))} (merge only models fine-tuned "
                    "from the same base)"
                )
            if other.dtype(name) != base.dtype(name):
                raise CheckpointError(
                    f"checkpoint {other.path}: tensor {name!r} is {other.dtype(name)} but the base "
                    f"has {base.dtype(name)} (inputs must share a dtype: convert them first; "
                    "--dtype sets only the output's dtype)"
                )
    return names


def copy_model_files(
    base_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> list[Path]:
    """Copy a HF folder's non-weight files (config, tokenizer, ...) to ``out_dir``.

    Skips weights (``WEIGHT_PATTERNS``) and hidden entries (``.cache``, ``.git``, temp files);
    symlinks (as in the HF cache) are copied as the files they point to. Returns the copied
    files, relative to ``out_dir``.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if not base_dir.is_dir():
        raise CheckpointError(
            f"base {base_dir} is not a folder, so it has no config or tokenizer to copy "
            "(pass the base as a Hugging Face model folder)"
        )
    copied = []
    for root, folders, files in os.walk(base_dir):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or any(fnmatch(name, p) for p in WEIGHT_PATTERNS):
                continue
            relative = Path(root).relative_to(base_dir) / name
            (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(root) / name, out_dir / relative)
            copied.append(relative)
    return copied


@contextmanager
def atomic_output(
    out: str | os.PathLike[str], *, is_dir: bool, force: bool = False
) -> Iterator[Path]:
    """Yield a temp path next to ``out``; move it to ``out`` only if the block succeeds.

    Checks up front that ``out`` does not exist (unless ``force``); with ``force`` the old ``out``
    is replaced only once the new one is complete. On error the temp path is removed, so nothing
    half-written is ever at ``out``. With ``is_dir`` the temp folder is created; otherwise the
    block must create the temp file.
    """
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise ConfigError(
            f"output {out} already exists (pass a new path, or --force to replace it)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    temp = out.parent / f".{out.name}.tmp-{token}"
    if is_dir:
        temp.mkdir()
    try:
        yield temp
        if not temp.exists():
            raise FileNotFoundError(f"atomic_output: the block did not create {temp}")
        if out.exists() or out.is_symlink():
            if not force:
                raise ConfigError(
                    f"output {out} appeared while fl-sim was writing it (pass a new path, or "
                    "--force to replace it)"
                )
            old = out.parent / f".{out.name}.old-{token}"
            os.rename(out, old)
            try:
                os.rename(temp, out)
            except BaseException:
                os.rename(old, out)
                raise
            _remove(old)
        else:
            os.rename(temp, out)
    except BaseException:
        _remove(temp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
