from cake_promotions.cli import main

main()
