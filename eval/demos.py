"""Entry point: the VAE lecture's pictures (the code lives in latentvae/demos.py; = `latentvae demo ...`).

    python eval/demos.py recon-grid  --vae VAE [--vae VAE ...] --data IMAGES --out grid.png
    python eval/demos.py prior       --vae AE_RUN --vae VAE_RUN --data IMAGES --out prior/
    python eval/demos.py interpolate --vae VAE --a IMG --b IMG --out interp/
"""
from latentvae.demos import main

if __name__ == "__main__":
    main()
