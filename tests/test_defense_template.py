"""The Defense template: ``repair`` seeds, copies, times and reports; a subclass only writes ``fit``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pytest
import torch

from forensics.core.errors import ForensicsError
from forensics.core.models import new_model
from forensics.core.registry import Registry
from forensics.core.templates import SHORT_TEMPLATES, fill
from forensics.core.tokenizer import WordTokenizer
from forensics.core.zeroshot import class_text_embeddings
from forensics.defenses import DEFENSES, Defense, Fitted, RepairData, build_defense

CLASSES = ["red", "green"]


@dataclass
class NudgeSettings:
    scale: float = 0.5
    steps: int = 2
    seed: int = 0


class Nudge(Defense):
    """Scales the copy's first image-tower weight ``steps`` times: the smallest fit that changes the repaired copy."""

    name = "nudge"
    summary = "test defense"
    settings_cls = NudgeSettings

    def check(self, model, data) -> None:
        if len(data.images) == 0:
            raise ForensicsError("nudge needs images")

    def fit(self, job) -> Fitted:
        repaired, data, should_stop = job.repaired, job.data, job.should_stop
        history = []
        for step in range(self.settings.steps):
            self.check_cancel(should_stop)
            with torch.no_grad():
                next(repaired.clip.visual.parameters()).mul_(self.settings.scale)
            history.append({"step": step + 1})
        self.drawn = torch.rand(3)  # torch was seeded from settings.seed by the template
        class_text_embeddings(repaired, data.class_names)  # fills a cache the template must drop
        return Fitted(samples_used=len(data.images), history=history, notes=["nudged"], details={"found": "x"})


@pytest.fixture(scope="module")
def registry() -> Registry:
    reg = Registry("repair method")
    reg.register(Nudge)
    return reg


@pytest.fixture(scope="module")
def tiny():
    tok = WordTokenizer.from_corpus([fill(t, c) for t in SHORT_TEMPLATES for c in CLASSES])
    model = new_model("tiny-rn", tokenizer=tok, seed=0)
    images = torch.rand(2, 3, model.image_size, model.image_size, generator=torch.Generator().manual_seed(0))
    return model, RepairData(images=images, labels=[0, 1], kinds=["anchor"] * 2, class_names=CLASSES)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.clip.state_dict().items()}


def test_settings_from_keywords_and_unknown_ones_refused(registry):
    defense = registry.build("nudge", scale=0.25)
    assert isinstance(defense, Nudge) and defense.settings == NudgeSettings(scale=0.25)
    assert Nudge(NudgeSettings(steps=5)).settings.steps == 5
    with pytest.raises(ForensicsError, match="unknown setting.*colour"):
        registry.build("nudge", colour="red")
    with pytest.raises(TypeError):
        Nudge(NudgeSettings(), scale=0.1)  # a settings object or keywords, not both
    assert "nudge" not in DEFENSES


def test_repair_changes_a_copy_and_fills_the_result(registry, tiny):
    model, data = tiny
    class_text_embeddings(model, CLASSES)
    before = state(model)
    defense = registry.build("nudge", steps=3, seed=7)
    result = defense.repair(model, data)
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())  # the input is untouched
    assert "text_cache" in model.__dict__  # ... and keeps its own cache
    assert result.model is not model and "text_cache" not in result.model.__dict__
    after = state(result.model)
    assert any(not torch.equal(v, before[k]) for k, v in after.items())
    assert result.samples_used == 2 and result.history == [{"step": 1}, {"step": 2}, {"step": 3}]
    assert result.notes == ["nudged"]
    assert result.settings == {**asdict(defense.settings), "found": "x", "precision": "fp32"}
    assert isinstance(result.seconds, float) and result.seconds >= 0
    torch.manual_seed(7)
    assert torch.equal(defense.drawn, torch.rand(3))


def test_check_and_cancel(registry, tiny):
    model, data = tiny
    before = state(model)
    empty = RepairData(images=data.images[:0], labels=[], kinds=[], class_names=CLASSES)
    with pytest.raises(ForensicsError, match="needs images"):
        registry.build("nudge").repair(model, empty)
    with pytest.raises(ForensicsError, match="repair cancelled"):
        registry.build("nudge").repair(model, data, should_stop=lambda: True)
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())


def test_the_five_defenses_are_registered_in_order():
    assert list(DEFENSES) == ["oracle-finetune", "invertune", "cbpt", "cleanclip", "abd"]
    for name in DEFENSES:
        cls = DEFENSES[name]
        assert issubclass(cls, Defense) and cls.name == name
        assert isinstance(build_defense(name).settings, cls.settings_cls)
    with pytest.raises(ForensicsError, match="unknown repair method"):
        build_defense("no-such-method")
    with pytest.raises(ForensicsError, match="unknown setting.*colour"):
        build_defense("cleanclip", colour="red")
    assert build_defense("invertune", inversion_steps=5).settings.detect.inversion_steps == 5  # flat detection keys
