"""The three-stage recipe: SFT, teacher-data adaptation (TD) and on-policy distillation (OPD)."""
