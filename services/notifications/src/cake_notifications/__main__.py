from cake_notifications.entrypoints.cli import main

main()
