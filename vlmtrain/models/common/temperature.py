"""The learned contrastive temperature, as every family here keeps it (open_clip's convention).

``logit_scale`` holds log(1/τ); the loss multiplies the similarities by exp(logit_scale). The trainer
clamps it after every step so that the scale stays within [1, 100], and logs the scale as the loss
sees it. Shape [1], not a scalar: DeepSpeed flattens parameters.
"""
from __future__ import annotations

import math

INIT_LOGIT_SCALE = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)
TEMPERATURE_BOUNDS = {"logit_scale": (0.0, LOGIT_SCALE_MAX)}
LOGGED_TEMPERATURE = {"logit_scale": math.exp}
