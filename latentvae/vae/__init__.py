"""The VAE, whatever class and door it comes in: what every job stands on.

    from latentvae.vae.loading import load_vae
    lv = load_vae("black-forest-labs/FLUX.2-dev[subfolder=vae]")   # one record (loaded.py), any family

  loading.py      a spec string -> LoadedVae (runs and checkpoints, local paths; spec.py parses the string,
                  folder.py reads diffusers folders and single files, hub.py hub ids)
  loaded.py       LoadedVae, the frozen record: module, family, stochastic, layout, factors, origin, hash
  families.py     the family table: one entry per diffusers class (kl, flux2, qwenimage, wan, dc,
                  hunyuanimage, tiny): moments, consumer latent, decode, 5-D, patch, conventions,
                  calibration, fp16 rule, which jobs
  conventions.py  each pipeline's latent formula and its inverse, citing the diffusers lines
  moments.py      exact latent moments, the one KL formula, calibration factors
  model.py        build and run (no disk): model.family from a config, InferenceEncoder, tiling
  convert.py      LDM single files and the TAESD references
"""
