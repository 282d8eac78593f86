"""TOV-VICReg (Goulão & Oliveira, 2022): VICReg on two views of o_t plus temporal order
verification on (current, previous, next) representations. docs/methods/tov_vicreg.md."""
