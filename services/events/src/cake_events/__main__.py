from cake_events.entrypoints.cli import main

main()
