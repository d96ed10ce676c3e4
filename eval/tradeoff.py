"""Entry point: the blur tradeoff sweep (= `latentvae tradeoff ...`; code: latentvae/tradeoff.py).

    # train the six sweep variants, evaluate them, plot (its time: benchmarks/RESULTS.md, "Evaluation")
    python eval/tradeoff.py --out runs/tradeoff --data ../shared/data/dev-images --max-side 256
    python eval/tradeoff.py --variants mse --variants "ae mse+lpips" --steps 100 --out runs/tradeoff --data IMAGES
    # existing VAEs instead: nothing is trained
    python eval/tradeoff.py --runs runs/a --runs runs/b --runs taesd:sd --out runs/tradeoff --data IMAGES
"""
from latentvae.cli import script_main

main = script_main("tradeoff")

if __name__ == "__main__":
    main()
