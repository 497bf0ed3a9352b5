from jaxmed.data.tfds.builder import main

main()
