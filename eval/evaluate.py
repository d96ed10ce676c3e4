"""Entry point: evaluate autoencoders side by side (= `latentvae evaluate ...`; code: latentvae/evaluate/).

    python eval/evaluate.py --vae runs/quickstart --vae taesd:sd --data IMAGES --out REPORT [--max-side 1024]
    python eval/evaluate.py --vae VAE --data SAVED_DATASET --image-column img --limit 100 --out REPORT
    python eval/evaluate.py --help
"""
from latentvae.cli import script_main

main = script_main("evaluate")

if __name__ == "__main__":
    main()
