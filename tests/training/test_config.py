"""TrainConfig: presets and Hugging Face directories, files and overrides, and validate()'s checks against a mesh
of several devices (nothing is built: no device beyond the count is needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.training import tiny_run
from xlstm_jax.models.xlstm_parallel.config import xLSTMLMConfig
from xlstm_jax.models.xlstm_parallel.hf import load_hf
from xlstm_jax.models.xlstm_parallel.sharding import MeshConfig
from xlstm_jax.training.config import PRESETS, DataConfig, TrainConfig
from xlstm_jax.training.optim import OptimizerConfig

HF_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "xlstm_tiny"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tiny_run.write_corpus(tmp_path_factory.mktemp("config") / "corpus")


def _config(corpus: Path, **changes) -> TrainConfig:
    data = DataConfig(kind="text", paths=(str(corpus),), batch_size=8)
    return TrainConfig(data=data, **changes)


def _problems(config: TrainConfig, num_devices: int) -> str:
    with pytest.raises(ValueError, match="bad training settings") as info:
        config.validate(num_devices)
    return str(info.value)


def test_presets(corpus):
    """Byte data gives the small presets 258 ids with BOS 256, EOS 257; the large ones keep 50304; parameters are
    float32 and 1.3b / 7b compute in bfloat16."""
    for name, sizes in PRESETS.items():
        config = _config(corpus, model=name)
        config.validate(1)
        model = config.model_config()
        assert {k: getattr(model, k) for k in sizes} == sizes
        assert model.vocab_size == sizes.get("vocab_size", 258)
        assert (model.bos_token_id, model.eos_token_id, model.param_dtype) == (256, 257, "float32")
    assert _config(corpus, model="7b").model_config().num_params() == xLSTMLMConfig.xlstm_7b().num_params()
    assert 1.3e9 < _config(corpus, model="1.3b").model_config().num_params() < 1.5e9


def test_hugging_face_directory(corpus):
    """A directory's architecture is its config.json's (parameters float32 for training); only dtypes and special
    ids may be overridden."""
    data = DataConfig(kind="text", paths=(str(corpus),), tokenizer=str(HF_DIR / "tokenizer.json"), batch_size=8)
    config = TrainConfig(model=str(HF_DIR), data=data)
    config.validate(1)
    assert config.model_config() == load_hf(HF_DIR, param_dtype="float32")[0]
    bad = config.replace(model_overrides={"num_blocks": 3})
    assert "model_overrides ['num_blocks'] would change the shapes of the weights" in _problems(bad, 1)


@pytest.mark.parametrize(
    "changes, num_devices, message",
    [
        ({"mesh": MeshConfig(data=2, fsdp=-1, tensor=1)}, 16, "data.batch_size=8 / accum_steps=1 = 8 rows"),
        ({"mesh": MeshConfig(fsdp=4, tensor=2), "accum_steps": 4}, 8, "= 2 rows per micro-batch must be divisible"),
        ({"mesh": MeshConfig(fsdp=1, tensor=4)}, 4, "the model's num_heads=2 must be divisible by the mesh's tensor=4"),
        ({"mesh": MeshConfig(data=3)}, 8, "the other axes' product 3 does not divide the device count 8"),
    ],
)
def test_splits_over_the_mesh(corpus, changes, num_devices, message):
    assert message in _problems(_config(corpus, **changes), num_devices)


def test_mlstm_backward(corpus):
    """The cell's backward where its Mosaic kernel runs: "xla" or "mosaic", anything else a problem."""
    assert _config(corpus).mlstm_backward == "mosaic"
    _config(corpus, mlstm_backward="xla").validate(1)
    assert "mlstm_backward must be one of ['xla', 'mosaic'], got 'cuda'" in _problems(
        _config(corpus, mlstm_backward="cuda"), 1
    )


def test_splits_that_fit(corpus):
    _config(corpus, mesh=MeshConfig(data=2, fsdp=2, tensor=2), accum_steps=2).validate(8)


def test_file_and_changes(corpus, tmp_path):
    """A file's sections are merged with the changes field by field; the optimiser's schedule spans ``steps``
    unless the file gives its length."""
    path = tmp_path / "run.toml"
    path.write_text(f'steps = 50\n[data]\npaths = ["{corpus}"]\nseq_len = 32\n[optimizer]\nlearning_rate = 0.01\n')
    config = TrainConfig.from_file(path, data={"batch_size": 4}, steps=200)
    assert (config.steps, config.data.seq_len, config.data.batch_size) == (200, 32, 4)
    assert config.optimizer == OptimizerConfig(learning_rate=0.01, total_steps=200, warmup_steps=20)
    assert TrainConfig(steps=30).optimizer_config == OptimizerConfig(total_steps=30, warmup_steps=3)
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
