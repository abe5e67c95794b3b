from cake_promotions.entrypoints.cli import main

main()
