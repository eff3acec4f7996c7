# Source this on a GPU machine without network (see docs/recipes.md, "Offline GPU machines"):
#   source runs/offline_env.sh
# Installs the wheels of .offline/whl into .offline/site (once) and points NANOCHAT_BASE_DIR at a
# base dir whose base_data is the corpus copy in .offline/corpus. Both folders are git-ignored and
# made on a networked machine by the maintainers' offline bundle script.
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -d "$_root/.offline/whl" ]]; then
  if [[ ! -d "$_root/.offline/site" ]]; then
    python3 -m pip install -q --no-index --no-deps --target "$_root/.offline/site" "$_root"/.offline/whl/*.whl
  fi
  export PYTHONPATH="$_root/.offline/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -d "$_root/.offline/corpus" ]]; then
  export NANOCHAT_BASE_DIR="$_root/.offline/base"
  mkdir -p "$NANOCHAT_BASE_DIR"
  ln -sfn "$_root/.offline/corpus" "$NANOCHAT_BASE_DIR/base_data"
fi
unset _root
