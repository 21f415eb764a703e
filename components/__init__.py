"""KFP components of the ShareGPT4V platform: `stages` (the components), `resources` (where they
run and what they may use) and `steps` (what each does, as plain functions without kfp)."""
