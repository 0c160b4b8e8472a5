"""Training data for b_psi and the image apps: exact-prior samples, 1/f^2 images, folders."""
