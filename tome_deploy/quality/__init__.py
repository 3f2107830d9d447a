"""Quality of a ToMe model on the user's own images: reading an image folder, a seeded split into
calibration and held-out images, accuracy / agreement / embedding metrics with 95% intervals, and the
quality budget a model must stay within.

Imports `artifact`, `runtime`, `core` and the base modules only; the metrics are pure numpy."""
