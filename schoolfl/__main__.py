from schoolfl.cli import main

main()
