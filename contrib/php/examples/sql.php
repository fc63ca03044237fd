<?php
// Enqueueing from PHP on the SQL backend.  The manual (docs/producer.rst)
// shows what lies between "begin" and "end"; tests/test_php.py runs it all.
require __DIR__ . '/../Snq.php';
$start = microtime(true);

// -- begin --
$pdo = new PDO(getenv('DATABASE_DSN'), getenv('DATABASE_USER') ?: null,
               getenv('DATABASE_PASSWORD') ?: null,
               [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION]);
$snq = new Snq\Producer(['queue' => ['backend' => 'db']], $pdo);

// As soon as possible:
$id = $snq->enqueue('webhook', ['url' => 'https://example.org/hook',
                                'body' => ['event' => 'follow']]);

// In the application's transaction: there if, and only if, it commits.
$pdo->beginTransaction();
$undone = $snq->enqueue('webhook', ['body' => ['event' => 'undone']]);
$pdo->rollBack();

$pdo->beginTransaction();
$later = $snq->enqueueMany('webhook', [['body' => ['n' => 1]], ['body' => ['n' => 2]]],
                           ['site' => 'default', 'delay' => 2]);
$pdo->commit();
// -- end --

echo json_encode(['handled' => [$id, ...$later], 'delayed' => $later,
                  'notBefore' => $start + 2, 'undone' => [$undone]]), "\n";
