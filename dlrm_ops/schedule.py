"""facebookresearch/dlrm's learning-rate policy (the MLPerf DLRM schedule):
linear warmup over ``num_warmup_steps``, constant, then a quadratic
(polynomial, power 2) decay over ``num_decay_steps`` from
``decay_start_step``, floored at 1e-7, and constant after it."""

from torch.optim.lr_scheduler import LRScheduler


class LRPolicy(LRScheduler):
    """dlrm's ``LRPolicyScheduler``, step for step: at its k-th ``step()``
    (counting the one the constructor makes as the first) the rate is
    ``lr * k / warmup`` while k < warmup, ``lr * ((decay - (k - start)) /
    decay) ** 2`` while start <= k < start + decay, and otherwise the last
    rate set (the base rate if none was)."""

    def __init__(
        self, optimizer, num_warmup_steps: int, decay_start_step: int, num_decay_steps: int
    ):
        if min(num_warmup_steps, decay_start_step, num_decay_steps) < 0:
            raise ValueError("warmup and decay steps must not be negative")
        if num_decay_steps and decay_start_step < num_warmup_steps:
            raise ValueError(
                f"the learning-rate warmup ({num_warmup_steps} steps) must end before the "
                f"decay starts (step {decay_start_step})"
            )
        self.num_warmup_steps = num_warmup_steps
        self.decay_start_step = decay_start_step
        self.num_decay_steps = num_decay_steps
        self.held = None
        super().__init__(optimizer)

    def get_lr(self):
        k = self._step_count
        if k < self.num_warmup_steps:
            scale = 1.0 - (self.num_warmup_steps - k) / self.num_warmup_steps
            self.held = [lr * scale for lr in self.base_lrs]
        elif self.decay_start_step <= k < self.decay_start_step + self.num_decay_steps:
            scale = (
                (self.num_decay_steps - (k - self.decay_start_step)) / self.num_decay_steps
            ) ** 2
            self.held = [max(1e-7, lr * scale) for lr in self.base_lrs]
        elif self.held is None or not self.num_decay_steps:
            return list(self.base_lrs)
        return list(self.held)
