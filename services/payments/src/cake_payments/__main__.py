from cake_payments.entrypoints.cli import main

main()
