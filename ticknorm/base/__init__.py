"""The ground floor: what every layer above may use, importing nothing of ticknorm but itself."""
