from cake_payments.cli import main

main()
