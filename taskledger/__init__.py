"""taskledger's composition root: settings, bootstrap and the command line."""
