#compdef orstack

_orstack_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _ORSTACK_COMPLETE=complete_zsh orstack)
}

compdef _orstack_completion orstack
