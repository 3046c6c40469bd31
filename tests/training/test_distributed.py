"""trainer=ddp on 2 gloo CPU processes gives one process's loss, gradients and (synced) validation metrics on the
same global batch; trainer=fsdp's config wraps the decoder layers; the start-up checks of both."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from hydra.utils import instantiate
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader
from transformers.models.musicgen.modeling_musicgen import MusicgenDecoderLayer

from tests.conftest import CAPTIONS, compose_train_cfg
from tinymusician.distill.module import DistillationModule
from tinymusician.models.musicgen import freeze, load_musicgen, load_tokenizer
from tinymusician.training.checks import ConfigError, check_config

WORLD_SIZE = 2
ITEMS = 8  # the global batch: 4 per rank
FRAMES = 16


def equal_length_items(student_dir: str) -> list[dict[str, torch.Tensor]]:
    """The global batch, item by item, every item of the same length.

    The CE and KD terms are means over valid positions; with equal lengths every rank holds as many as any
    other, so the mean of the ranks' means (what DDP's averaged gradient differentiates) is the global mean.
    With unequal lengths each rank's token-weighted mean has its own denominator and the two differ.
    """
    tokenizer = load_tokenizer(student_dir)
    vocab = load_musicgen(student_dir).config.decoder.vocab_size
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, vocab, (ITEMS, 4, FRAMES), generator=generator)
    text = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(ITEMS)], padding=True, return_tensors="pt")
    return [
        {
            "codes": codes[i],
            "lengths": torch.tensor(FRAMES),
            "input_ids": text["input_ids"][i],
            "attention_mask": text["attention_mask"][i],
        }
        for i in range(ITEMS)
    ]


def distillation_module(cfg, student_dir: str, teacher_dir: str) -> DistillationModule:
    return DistillationModule(
        student=load_musicgen(student_dir),
        teacher=freeze(load_musicgen(teacher_dir)),
        loss=instantiate(cfg.loss),
        optimizer=instantiate(cfg.optim.optimizer),
        cond_dropout=0.0,  # no random caption drop: every process must see the same batch as the reference
    )


class GradientsBeforeStep(L.Callback):
    """The student's gradients as the optimizer would see them (after DDP's all-reduce)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {
            name: p.grad.detach().clone()
            for name, p in pl_module.student.named_parameters()
            if p.requires_grad and p.grad is not None
        }


def run_rank(rank: int, port: int, student_dir: str, teacher_dir: str, out: str) -> None:
    """One DDP rank, started as torchrun would (the environment names it), on conf/trainer/ddp.yaml's strategy."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(WORLD_SIZE),
        NODE_RANK="0",
        LOCAL_RANK=str(rank),
        RANK=str(rank),
    )
    torch.set_num_threads(1)
    cfg = compose_train_cfg(["trainer=ddp", "trainer.accelerator=cpu", "loss=fkl"], Path(out))
    items = equal_length_items(student_dir)
    module = distillation_module(cfg, student_dir, teacher_dir)
    grads = GradientsBeforeStep()
    trainer = instantiate(
        cfg.trainer,
        max_steps=1,
        logger=False,
        callbacks=[grads],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=None,
        default_root_dir=out,
    )
    # Lightning adds a DistributedSampler (no shuffling): rank r gets items r, r + 2, ...
    metrics = trainer.validate(module, dataloaders=DataLoader(items, batch_size=2), verbose=False)[0]
    trainer.fit(module, train_dataloaders=DataLoader(items, batch_size=ITEMS // WORLD_SIZE))
    result = {"loss": module.last_train_logs["train/loss"], "grads": grads.grads, "val": metrics}
    torch.save(result, Path(out) / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_matches_one_process_on_the_global_batch(tiny_pair, cache_dir, tmp_path, single_thread):
    student_dir, teacher_dir = str(tiny_pair.student), str(tiny_pair.teacher)
    mp.spawn(
        run_rank,
        args=(free_port(), student_dir, teacher_dir, str(tmp_path)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    # The reference: one process, the whole global batch, the same module and loss.
    cfg = compose_train_cfg(["loss=fkl"], tmp_path)
    items = equal_length_items(student_dir)
    module = distillation_module(cfg, student_dir, teacher_dir)
    module.train()
    batch = next(iter(DataLoader(items, batch_size=ITEMS)))
    loss = module.training_step(batch, 0)
    loss.backward()
    reference = {n: p.grad for n, p in module.student.named_parameters() if p.requires_grad}

    # DDP averages the ranks' gradients: with equal-length shares that is the global batch's gradient
    mean_loss = sum(r["loss"] for r in ranks) / WORLD_SIZE
    assert mean_loss == pytest.approx(float(loss), rel=1e-5)
    assert ranks[0]["loss"] != pytest.approx(ranks[1]["loss"], rel=1e-3)  # the ranks did see different items
    for rank in ranks:
        assert rank["grads"].keys() == reference.keys()
        for name, grad in reference.items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # Validation (before the step, as the ranks did): each rank scores its half, and the logged epoch values
    # are the global ones on every rank
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    everything = trainer.validate(module, dataloaders=DataLoader(items, batch_size=2), verbose=False)[0]
    first_half = trainer.validate(module, dataloaders=DataLoader(items[0::2], batch_size=2), verbose=False)[0]
    assert set(ranks[0]["val"]) == set(everything) and "val/kl_to_teacher" in everything
    for key, value in everything.items():
        for rank in ranks:
            assert float(rank["val"][key]) == pytest.approx(float(value), rel=1e-5), key
    # without the sync, rank 0 would report its own half, which differs
    assert float(first_half["val/ce"]) != pytest.approx(float(everything["val/ce"]), rel=1e-4)


def test_fsdp_config_wraps_the_student_decoder_layers(tiny_pair, tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    cfg = compose_train_cfg(["trainer=fsdp", "trainer.strategy.sharding_strategy=SHARD_GRAD_OP"], tmp_path)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP"
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    student = load_musicgen(str(tiny_pair.student))
    wrapped = [m for m in student.modules() if policy(module=m, recurse=False, nonwrapped_numel=0)]
    layers = list(student.decoder.model.decoder.layers)
    assert len(layers) > 0 and wrapped == layers
    assert all(isinstance(m, MusicgenDecoderLayer) for m in wrapped)


def test_ddp_config_is_lightning_ddp_without_unused_parameter_search(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    cfg = compose_train_cfg(["trainer=ddp"], tmp_path)
    assert cfg.trainer.devices == 2 and cfg.trainer.max_steps == 6  # ddp.yaml extends default (+ overrides)
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs.get("find_unused_parameters") is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer=fsdp", "trainer.accelerator=cpu"], "FSDPStrategy runs on GPUs only"),
        (["trainer=fsdp"], None),  # accelerator=gpu: fine at start-up (the GPU itself is Lightning's check)
        (["model.teacher_sharding=shard"], "model.teacher_sharding=shard"),
        (["trainer=ddp", "model.teacher_sharding=replicate"], None),
        (["trainer=ddp", "hydra/launcher=joblib"], "which a joblib worker is not"),
    ],
)
def test_start_up_checks_of_strategies(overrides, message, cache_dir, tmp_path):
    cfg = compose_train_cfg(overrides, tmp_path)
    if message is None:
        check_config(cfg)
    else:
        with pytest.raises(ConfigError, match=message):
            check_config(cfg)


def test_a_rank_reruns_its_multirun_job_alone():
    from omegaconf import OmegaConf

    from tinymusician.training.distributed import rerun_overrides

    hydra_cfg = OmegaConf.create(
        {
            "overrides": {
                "task": ["+sweep=ablation", "+experiment=kd_only", "seed=1", "trainer=ddp"],
                "hydra": [
                    "hydra.mode=MULTIRUN",
                    "hydra.sweep.dir=/tmp/s",
                    "hydra/launcher=slurm",
                    "hydra.launcher.partition=gpu",
                    "hydra.sweeper.params.seed=1,2",
                    "hydra.job.chdir=false",
                ],
            }
        }
    )
    # the job's own overrides, the hydra ones that shape a job, and RUN mode (the preset says MULTIRUN)
    assert rerun_overrides(hydra_cfg) == [
        "+sweep=ablation",
        "+experiment=kd_only",
        "seed=1",
        "trainer=ddp",
        "hydra.job.chdir=false",
        "hydra.mode=RUN",
    ]
