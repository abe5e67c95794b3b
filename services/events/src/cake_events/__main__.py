from cake_events.cli import main

main()
