<?php
// The PHP recipe of docs/cli.md, as a test runs it: php lock-recipe.php LOCKCTL NAME LOCK_FILE
// LOCKCTL is the command that runs lockctl; every line printed is one observation.
[, $lockctl, $name, $file] = $argv;

function flock_free(string $file): string {
    $fp = fopen($file, "r");
    $free = flock($fp, LOCK_EX | LOCK_NB);
    fclose($fp);  // and with it any flock it got
    return $free ? "free" : "held";
}

// A lease for this PHP process: exec() runs the command through sh, which execs lockctl,
// whose parent, and so the process the lease is tied to, is this one.
exec("$lockctl acquire " . escapeshellarg($name), $out, $rc);
echo "acquire $rc\n";
echo "while held: " . flock_free($file) . "\n";
exec("$lockctl release " . escapeshellarg($name), $out, $rc);
echo "release $rc\n";
echo "after release: " . flock_free($file) . "\n";

// The other way round: a plain flock() in PHP holds lockctl off.
$fp = fopen($file, "r");
flock($fp, LOCK_EX);
exec("$lockctl acquire -n " . escapeshellarg($name) . " -- true 2>/dev/null", $out, $rc);
echo "lockctl while PHP flocks: $rc\n";
fclose($fp);
