"""Fair-GAN resynthesis (Jain, Memon, Togelius 2023, "Fair GANs through model rebalancing").

Measure how unevenly a generator covers the classes of an attribute classifier, collect an equal number
of latents per class by exploring its latent space, write the balanced synthetic set in the img2dataset
Parquet layout, and retrain a generator on it with a bias-mitigation loss. The pure parts live here:

- :mod:`rebalance.fairgan.metrics`: fairness discrepancy with confidence intervals, per-class feature
  distance (image-quality proxy);
- :mod:`rebalance.fairgan.explore`: breadth-first latent-space exploration given generator/classifier
  callables;
- :mod:`rebalance.fairgan.loss`: the differentiable bias-mitigation loss;
- :mod:`rebalance.fairgan.models`: the DCGAN generator and discriminator, the small CNN classifier;
- :mod:`rebalance.fairgan.classifiers`: the three attribute classifiers (run clusters, zero-shot CLIP,
  a user torch module);
- :mod:`rebalance.fairgan.io`: checkpoints (safetensors) and the Parquet writer of the balanced set.

The Ray Train jobs are ``jobs/train_gan.py`` and ``jobs/fair_gan.py`` (docs/fair_gan.md).
"""

from pathlib import Path

__all__ = ["SHIPPED_GENERATOR"]

#: The DCGAN generator trained by ``jobs.train_gan`` on the built-in dataset (float16 safetensors with its
#: config as metadata; docs/fair_gan.md says how). It inherits the dataset's long tail.
SHIPPED_GENERATOR = (
    Path(__file__).resolve().parents[1] / "model_configs" / "fairgan-dcgan-synthetic.safetensors"
)
