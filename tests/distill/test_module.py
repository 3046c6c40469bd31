"""DistillationModule inside a real fit: train/eval modes of its parts, and the validation keys it declares."""

from __future__ import annotations

from tests.conftest import compose_train_cfg
from tinymusician.distill import module as module_lib
from tinymusician.train import train


def modes(module) -> dict[str, bool]:
    student = module.student
    return {
        "decoder": student.decoder.training,
        "decoder_all": all(m.training for m in student.decoder.modules()),
        "text_encoder": any(m.training for m in student.text_encoder.modules()),
        "audio_encoder": any(m.training for m in student.audio_encoder.modules()),
        "teacher": any(m.training for m in module.teacher.modules()),
    }


def test_student_trains_in_train_mode_and_validates_in_eval_mode(tmp_path, tiny_pair, monkeypatch):
    seen: dict[str, list[dict[str, bool]]] = {"train": [], "val": []}
    training_step = module_lib.DistillationModule.training_step
    validation_step = module_lib.DistillationModule.validation_step

    def probe_train(self, batch, batch_idx):
        seen["train"].append(modes(self))
        return training_step(self, batch, batch_idx)

    def probe_val(self, batch, batch_idx):
        seen["val"].append(modes(self))
        return validation_step(self, batch, batch_idx)

    monkeypatch.setattr(module_lib.DistillationModule, "training_step", probe_train)
    monkeypatch.setattr(module_lib.DistillationModule, "validation_step", probe_val)
    cfg = compose_train_cfg(
        ["+experiment=kd_only", "trainer.max_steps=4", "trainer.val_check_interval=2"], tmp_path
    )
    _, objects = train(cfg)
    assert len(seen["train"]) == 4 and seen["val"]
    # from_pretrained hands over eval-mode modules: the decoder must still train with its dropout on
    for step in seen["train"]:
        assert step == {
            "decoder": True,
            "decoder_all": True,
            "text_encoder": False,
            "audio_encoder": False,
            "teacher": False,
        }
    for step in seen["val"]:  # before fit, during fit and after it
        assert not any(step.values())

    # the keys validation logs are exactly the declared ones (train.check_config validates against them)
    logged = {k for k in objects["trainer"].callback_metrics if k.startswith("val/") and k != "val/ce_bar"}
    num_codebooks = objects["models"].student.config.decoder.num_codebooks
    assert logged == set(module_lib.validation_metric_keys(num_codebooks, with_teacher=True))
