"""A vision-language model whose memory a kvpolicy policy manages (the ``vision`` extra).

The paper's memories transfer across modalities; this package makes that testable with
installable parts only: a "video" of handwritten digits (scikit-learn's bundled 8×8 images) with a
question about one frame (`task`), a small `LlavaForConditionalGeneration` trained on it on a CPU
and shipped as package data (`model`, `train`), and the evaluation of every preset on it — accuracy
against the cache kept, and which frames' tokens each policy kept (`evaluate`).
``python -m kvpolicy.vision --help`` lists the commands.

Nothing in kvpolicy's core imports this package; it needs ``pip install "kvpolicy[vision]"``
(scikit-learn).
"""

from __future__ import annotations

from kvpolicy.vision.task import VisionExtraMissingError, require_vision_extra

__all__ = ["VisionExtraMissingError", "require_vision_extra"]
