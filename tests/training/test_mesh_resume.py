"""Training on the 8-device (data 2, fsdp 2, tensor 2) CPU mesh: sharded state, bit-exact resume onto the mesh.

``test_mesh_resume`` needs 8 devices. In a process with fewer, ``test_in_subprocess`` runs this module again
in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before jax is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import pytest

from tests.training.test_checkpoint import CONFIG, OPT, RUNTIME, assert_trees_equal, batch_at
from xlstm_jax.models.xlstm_parallel.model import xLSTMLMModel
from xlstm_jax.training.checkpoint import TrainCheckpointer
from xlstm_jax.training.init import init_params
from xlstm_jax.training.optim import make_optimizer, make_schedule
from xlstm_jax.training.step import create_train_state, make_train_step, train_state_shardings

DEVICES = 8
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(jax.device_count() >= DEVICES, reason="8 devices here: test_mesh_resume runs in this process")
def test_in_subprocess():
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", f"{__file__}::test_mesh_resume"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "1 passed" in result.stdout, result.stdout[-2000:]


@pytest.mark.skipif(jax.device_count() < DEVICES, reason="needs 8 devices (test_in_subprocess provides them)")
def test_mesh_resume(tmp_path):
    from xlstm_jax.models.xlstm_parallel.sharding import MeshConfig, batch_sharding, make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:DEVICES])
    model = xLSTMLMModel(CONFIG, RUNTIME)
    optimizer = make_optimizer(OPT)

    def fresh():
        return create_train_state(init_params(CONFIG, jax.random.PRNGKey(0)), optimizer, jax.random.PRNGKey(1))

    target = jax.eval_shape(fresh)
    shardings = train_state_shardings(target, CONFIG, mesh, optimizer)
    step = make_train_step(
        model, optimizer, schedule=make_schedule(OPT), state_shardings=shardings, batch_sharding=batch_sharding(mesh)
    )
    # The fsdp axis splits the embedding's model width and Adam's moments with it.
    assert shardings.params["embedding"]["embedding"].spec != jax.sharding.PartitionSpec()
    assert shardings.opt_state[1][0].mu["embedding"]["embedding"] == shardings.params["embedding"]["embedding"]

    def run(state, start, stop):
        losses = []
        with jax.set_mesh(mesh), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
            for position in range(start, stop):
                state, metrics = step(state, batch_at(position))
                losses.append(float(metrics["loss"]))
        return state, losses

    straight, losses6 = run(jax.device_put(fresh(), shardings), 0, 6)
    state, losses = run(jax.device_put(fresh(), shardings), 0, 3)
    with TrainCheckpointer(tmp_path, save_every=3, max_to_keep=2) as ckpt:
        ckpt.save(state, {"position": 3}, final=True)
    del state
    with TrainCheckpointer(tmp_path, save_every=3, max_to_keep=2) as ckpt:
        restored, data_state = ckpt.restore_latest(target, shardings=shardings)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    resumed, more = run(restored, data_state["position"], 6)
    assert losses + more == losses6
    assert_trees_equal(resumed, straight)
    assert step._cache_size() == 1
