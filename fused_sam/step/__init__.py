"""The parts of a SAM step, each callable without the optimizer (explicit arguments).

:class:`fused_sam.FusedSAM` is the public API and the step state machine; it holds a plan and
its policies and calls these modules at fixed points of the step:

* :mod:`~fused_sam.step.state`: the in-flight bookkeeping, in one mutable object;
* :mod:`~fused_sam.step.plan`: per-group SAM values flattened per tensor, gradient collection,
  the cached buckets and backups of a step, the non-finite flag of a pass;
* :mod:`~fused_sam.step.base_steps`: one entry per base optimizer family (SGD; Adam/AdamW) with
  the fused restore-and-step, and the unfused path through the base's own ``step()``;
* :mod:`~fused_sam.step.amp`: the GradScaler protocol (loss scale, skip flags, unscaling);
* :mod:`~fused_sam.step.policies`: the variants (schedule, direction, masks) behind one object;
* :mod:`~fused_sam.step.validation`: every check of constructor values, param groups and
  checkpoints, with its error text;
* :mod:`~fused_sam.step.checkpoint`: the extra ``state_dict()`` keys and the rollback of a
  refused load.
"""
