"""Entry point: evaluate autoencoders side by side (the code lives in latentvae/evaluate.py).

    python eval/evaluate.py --vae runs/quickstart --vae taesd:sd --data IMAGES --out REPORT [--max-side 1024]
"""
from latentvae.evaluate import main

if __name__ == "__main__":
    main()
