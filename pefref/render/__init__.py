"""Pictures: architecture diagrams and typology graphs (networkx graphs -> DOT -> dot), and the site."""
