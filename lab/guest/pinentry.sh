#!/bin/sh
# A non-interactive pinentry for the tests (gpg-agent's pinentry-program):
# speaks just enough of the Assuan pinentry protocol and answers GETPIN with
# the PIN in the file "pin" beside this script, or "admin-pin" when the prompt
# asks for the Admin PIN.  Test cards only: the PINs are the cards' defaults.
here=${0%/*}
desc=
echo "OK ccidbridge test pinentry"
while read -r cmd rest; do
    case "$cmd" in
        SETDESC|SETPROMPT) desc="$desc $rest"; echo OK ;;
        GETPIN)
            case "$desc" in
                *Admin*|*admin*) file=$here/admin-pin ;;
                *) file=$here/pin ;;
            esac
            echo "D $(cat "$file")"
            echo OK
            desc= ;;
        BYE) echo OK; exit 0 ;;
        *) echo OK ;;
    esac
done
