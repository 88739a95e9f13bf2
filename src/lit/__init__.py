"""LightningModules: one training step's maths each (SFT, DPO); Lightning owns the loop."""
