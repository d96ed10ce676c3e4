"""Entry point: the VAE lecture's pictures (= `latentvae demo ...`; code: latentvae/demos.py).

    python eval/demos.py recon-grid  --vae VAE [--vae VAE ...] --data IMAGES --out grid.png [--limit 4]
    python eval/demos.py prior       --vae AE_RUN --vae VAE_RUN --data IMAGES --out prior/
    python eval/demos.py interpolate --vae VAE --a IMG --b IMG --out interp/ [--resolution 256]
    python eval/demos.py --help
"""
from latentvae.cli import script_main

main = script_main("demo")

if __name__ == "__main__":
    main()
