"""The stage calls of the sft and prefs jobs: one batch of inputs -> its records. Picklable, so a Ray
replica runs them with its own engine (see cai.ray_executor.EngineProcess)."""

from __future__ import annotations

from collections.abc import Callable

from cai.constitution_plan import ConstitutionPlan
from cai.contrastive import label_pass, sample_pass
from cai.critique import run_phase1
from cai.engine.base import Engine
from cai.ray_executor import EngineProcess
from cai.recipe import EngineSpec, Phase1Config, Phase2Config
from cai.records import PreferenceRecord, SampledAnswers, SFTRecord, SourcePrompt


class Phase1Process(EngineProcess):
    """A phase-1 batch: critique-then-revise trajectories (picklable: see cai.ray_executor.EngineProcess)."""

    def __init__(self, spec: EngineSpec, plan: ConstitutionPlan, config: Phase1Config,
                 engine_of: Callable[[], Engine] | None = None, on_step=None):
        super().__init__(spec, engine_of, on_step)
        self.plan, self.config = plan, config

    def run(self, engine: Engine, batch: list[SourcePrompt]) -> list[SFTRecord]:
        return run_phase1(batch, self.plan, engine, self.config, on_step=self.on_step)


class SampleProcess(EngineProcess):
    """A phase-2 pass-1 batch: K sampled answers per prompt, or a contrastive pair under the prompt's
    sampled principle (`plan`: needed then) (picklable: see cai.ray_executor.EngineProcess)."""

    def __init__(self, spec: EngineSpec, config: Phase2Config, engine_of: Callable[[], Engine] | None = None,
                 on_step=None, plan: ConstitutionPlan | None = None):
        super().__init__(spec, engine_of, on_step)
        self.config, self.plan = config, plan

    def run(self, engine: Engine, batch: list[SourcePrompt]) -> list[SampledAnswers]:
        return sample_pass(batch, self.plan, engine, self.config, on_step=self.on_step)


class JudgeProcess(EngineProcess):
    """A phase-2 pass-2 batch: pairs judged in both orders, or contrastive pairs labelled by construction
    (labeller contrastive: no engine is built) (picklable: see cai.ray_executor.EngineProcess)."""

    def __init__(self, spec: EngineSpec, plan: ConstitutionPlan, config: Phase2Config,
                 engine_of: Callable[[], Engine] | None = None, on_step=None):
        super().__init__(spec, engine_of, on_step)
        self.plan, self.config = plan, config

    def engine(self) -> Engine | None:
        return None if self.config.labeller == "contrastive" else super().engine()

    def run(self, engine: Engine | None, batch: list[SampledAnswers]) -> list[PreferenceRecord]:
        return label_pass(batch, self.plan, engine, self.config, on_step=self.on_step)
